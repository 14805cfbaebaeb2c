from __future__ import annotations

from pathlib import Path

import pytest

from facility.config import ConfigError, FacilityConfig, config_json_schema, load_config


def test_defaults_are_valid_and_paths_hang_off_home(tmp_path: Path) -> None:
    config = load_config(None, environ={})
    assert isinstance(config, FacilityConfig)
    assert config.state_path == config.home / "state"
    assert {r.name for r in config.regions} == {"east", "west"}


def test_file_and_environment_are_merged(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("home: here\ncluster: {max_workers: 3}\n")
    config = load_config(path, environ={"FACILITY_CLUSTER__MIN_WORKERS": "2"})
    assert config.cluster.max_workers == 3
    assert config.cluster.min_workers == 2
    assert config.home == (tmp_path / "here").resolve()


def test_other_facility_variables_are_not_settings(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("home: here\n")
    config = load_config(path, environ={"FACILITY_GROUPS": "cms", "FACILITY_HUB_CLIENT_SECRET": "x",
                                        "FACILITY_ACCESS_TOKEN": "t", "FACILITY_HOME": "there"})
    assert config.home == (tmp_path / "there").resolve()


def test_bad_value_names_key_expectation_and_source(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("cluster: {max_workers: many}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    message = str(err.value)
    assert "cluster.max_workers" in message
    assert "integer" in message
    assert str(path) in message
    assert "'many'" in message


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"processing\.on_bad_input.*FACILITY_PROCESSING__ON_BAD_INPUT"):
        load_config(None, environ={"FACILITY_PROCESSING__ON_BAD_INPUT": "ignore"})


def test_an_mmap_threshold_glibc_would_ignore_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"cluster\.malloc_mmap_threshold.*33554432.*"
                                          r"FACILITY_CLUSTER__MALLOC_MMAP_THRESHOLD"):
        load_config(None, environ={"FACILITY_CLUSTER__MALLOC_MMAP_THRESHOLD": str(64 * 2**20)})


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("cluster: {max_wrokers: 3}\n")
    with pytest.raises(ConfigError, match=r"cluster\.max_wrokers: unknown setting"):
        load_config(path, environ={})


def test_min_above_max_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"min_workers .5. is above max_workers .2."):
        load_config(None, environ={"FACILITY_CLUSTER__MIN_WORKERS": "5",
                                   "FACILITY_CLUSTER__MAX_WORKERS": "2"})


def test_missing_and_malformed_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{bad}.*not valid YAML"):
        load_config(bad, environ={})


def test_json_schema_is_strict() -> None:
    schema = config_json_schema()
    assert schema["additionalProperties"] is False
    assert "cluster" in schema["properties"]
