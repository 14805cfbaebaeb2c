"""XRootD data servers, one per served region, and XCaches in front of them, as a site runs them.

Each server exports the region's directory read-only over ``root://`` and, through XRootD's
own HTTP plugin (XrdHttp), over ``https://``, both with the facility's TLS certificate
(:mod:`facility.data.tls`). A read needs the user's VO token (:mod:`facility.data.tokens`):
over ``root://`` the client presents it in XRootD's ``ztn`` protocol, which XRootD allows only
on TLS connections; over ``https://`` in the Authorization header. The SciTokens plugin
(Debian's ``xrootd-scitokens-plugins``) checks the signature with the issuer's public keys,
the expiry, the audience and the ``storage.read`` scope.

libscitokens fetches an issuer's keys over https only. The embedded provider speaks http on
this machine, so the facility puts its published keys (fetched from its ``jwks_uri``) into
libscitokens' key cache before the servers start; an https issuer is fetched by the library.

A region may have an XCache (``XrdPss`` proxy with the ``XrdPfc`` file cache). It checks the
user's token like a server, and reads from the region's server with a token of its own (a
service token of the facility's client, kept in a file only the server account can read and
renewed with the users' tokens).

When started as root a server drops to the unprivileged ``xrootd`` account (``-R``). XRootD 5
has no setting for the address it listens on: servers listen on every interface, and what
guards them is the token, TLS and the read-only export.
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import shutil
import sqlite3
import tempfile
import time
import urllib.request
from pathlib import Path

from facility.config import CacheConfig, FacilityConfig, RegionConfig
from facility.data.tls import data_tls, ensure_data_tls
from facility.data.tokens import (
    RENEW_BEFORE_SECONDS,
    fetch_local_token,
    remaining_seconds,
    trusted_issuers,
    write_private,
)
from facility.embedded.services import Service
from facility.errors import InfrastructureError

SERVER_ACCOUNT = "xrootd"
# How long keys put into libscitokens' cache are used before it tries to fetch them again.
KEY_CACHE_SECONDS = 365 * 86400
# XRootD keeps unix sockets in ``<adminpath>/<instance>/.xrd/`` and refuses to start when that
# folder's path has this many characters or more (a socket's path must fit in 108 bytes).
ADMIN_PATH_LIMIT = 100


class DataServerError(InfrastructureError, RuntimeError):
    """The XRootD server cannot be set up (missing binary, unreadable directory...)."""


def xrootd_binary() -> str:
    path = shutil.which("xrootd")
    if path is None:
        raise DataServerError(
            "the xrootd server is not installed; `make demo` and `make test` install the Debian "
            "package xrootd-server (apt-get install xrootd-server)"
        )
    return path


def _run_as() -> str | None:
    """Account to drop to: only root can switch users, and root must not serve files."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVER_ACCOUNT)
    except KeyError as exc:
        raise DataServerError(f"the {SERVER_ACCOUNT!r} account does not exist; reinstall "
                              "xrootd-server") from exc
    return SERVER_ACCOUNT


def security_base(config: FacilityConfig) -> Path:
    return config.state_path / "xrootd"


def instance_name(name: str) -> str:
    return f"facility-{name}"


def admin_folder(config: FacilityConfig, name: str) -> Path:
    """Where a server keeps its sockets and pid file: beside its config, unless the facility's
    home is so deep that XRootD would refuse the path; then a short folder in the system's
    temporary folder, named after the state folder so that two facilities never share one."""
    preferred = security_base(config) / name / "admin"
    if len(f"{preferred}/{instance_name(name)}/.xrd/") < ADMIN_PATH_LIMIT:
        return preferred
    return _outside_admin_base(config) / name


def _outside_admin_base(config: FacilityConfig) -> Path:
    digest = hashlib.sha256(str(config.state_path.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"facility-xrd-{os.getuid()}-{digest}"


def remove_outside_admin_folders(config: FacilityConfig) -> None:
    """After the servers stopped: nothing of a facility stays in the temporary folder."""
    shutil.rmtree(_outside_admin_base(config), ignore_errors=True)


def _make_admin_folder(admin: Path, preferred_parent: Path) -> None:
    """A short admin folder outside the state folder lives in a folder of the facility's own:
    refuse one that someone else made (or a link), since the server trusts what is in it."""
    if admin.parent != preferred_parent:
        try:
            admin.parent.mkdir(mode=0o711)
        except FileExistsError:
            info = admin.parent.lstat()
            if not admin.parent.is_dir() or admin.parent.is_symlink() \
                    or info.st_uid != os.geteuid():
                raise DataServerError(
                    f"{admin.parent} (the XRootD servers' admin folder) exists but is not a "
                    "folder of this account's; remove it") from None
        admin.parent.chmod(0o711)
    admin.mkdir(parents=True, exist_ok=True)


def _tls_lines(config: FacilityConfig) -> list[str]:
    tls = data_tls(config)
    return [f"xrd.tls {tls.cert} {tls.key}", f"xrd.tlsca certdir {tls.ca_dir}",
            "xrootd.tls all"]


def _token_lines(config: FacilityConfig) -> list[str]:
    """Authentication by token only (``ztn``) and authorization by the SciTokens plugin; the
    authorization file it is chained to grants nothing."""
    if not config.data_access.require_token:
        return []
    base = security_base(config)
    return ["xrootd.seclib libXrdSec.so", "sec.protocol ztn", "sec.protbind * only ztn",
            "ofs.authorize 1", f"acc.authdb {base / 'authdb'}",
            f"ofs.authlib ++ libXrdAccSciTokens.so config={base / 'scitokens.cfg'}",
            "http.header2cgi Authorization authz"]


def server_config_text(config: FacilityConfig, region: RegionConfig, admin_dir: Path) -> str:
    """The xrootd configuration file for one region."""
    assert region.serve is not None
    root = config.region_root(region)
    lines = [
        f"# generated by facility for region {region.name}",
        f"xrd.port {region.serve.xrootd_port}",
        "all.export / nolock r/o",
        f"oss.localroot {root}",
        f"all.adminpath {admin_dir}",
        f"all.pidpath {admin_dir}",
        "xrootd.async off",
        *_tls_lines(config),
    ]
    if region.serve.http_port:
        lines.append(f"xrd.protocol XrdHttp:{region.serve.http_port} libXrdHttp.so")
    lines += _token_lines(config)
    return "\n".join(lines) + "\n"


def cache_config_text(config: FacilityConfig, region: RegionConfig, admin_dir: Path) -> str:
    """The configuration of the XCache in front of a region's server."""
    assert region.serve is not None
    assert region.cache is not None
    cache = region.cache
    lines = [
        f"# generated by facility: XCache of region {region.name}",
        f"xrd.port {cache.xrootd_port}",
        "all.export / nolock r/o",
        "ofs.osslib libXrdPss.so",
        f"pss.origin {region.host}:{region.serve.xrootd_port}",
        "pss.cachelib libXrdPfc.so",
        f"pfc.ram {cache.ram}",
        f"pfc.blocksize {cache.block_size}",
        f"pfc.prefetch {cache.prefetch}",
        f"oss.localroot {cache_dir(config, region)}",
        f"all.adminpath {admin_dir}",
        f"all.pidpath {admin_dir}",
        *_tls_lines(config),
        *_token_lines(config),
    ]
    return "\n".join(lines) + "\n"


def cache_dir(config: FacilityConfig, region: RegionConfig) -> Path:
    assert region.cache is not None
    if region.cache.cache_dir:
        return config.path(region.cache.cache_dir)
    return config.state_path / "xcache" / region.name


# ---------------------------------------------------------------------------------------------
# what the servers need to check tokens


def cache_token_file(config: FacilityConfig) -> Path:
    return security_base(config) / "cache-token"


def scitokens_config_text(config: FacilityConfig) -> str:
    """The SciTokens plugin's settings: the trusted issuers, the audience; a request without an
    acceptable token is refused."""
    access = config.data_access
    lines = ["[Global]", f"audience = {access.audience}", "onmissing = deny", ""]
    for number, issuer in enumerate(trusted_issuers(config)):
        lines += [f"[Issuer vo{number}]", f"issuer = {issuer}", "base_path = /", ""]
    return "\n".join(lines)


def key_cache_home(config: FacilityConfig) -> Path:
    """``XDG_CACHE_HOME`` of the servers: libscitokens keeps issuers' keys beneath it."""
    return security_base(config) / "key-cache"


def _published_keys(issuer: str) -> dict:
    with urllib.request.urlopen(f"{issuer}/.well-known/openid-configuration", timeout=10) as reply:
        jwks_uri = json.load(reply)["jwks_uri"]
    with urllib.request.urlopen(jwks_uri, timeout=10) as reply:
        return dict(json.load(reply))


def seed_key_cache(config: FacilityConfig) -> None:
    """Put the keys of every trusted http:// issuer into libscitokens' cache (its own table:
    issuer, and the keys with when to fetch them again and when they expire)."""
    folder = key_cache_home(config) / "scitokens"
    folder.mkdir(parents=True, exist_ok=True)
    now = int(time.time())
    with sqlite3.connect(folder / "scitokens_cpp.sqllite") as db:
        db.execute("CREATE TABLE IF NOT EXISTS keycache (issuer text UNIQUE PRIMARY KEY NOT NULL,"
                   " keys text NOT NULL)")
        for issuer in trusted_issuers(config):
            if not issuer.startswith("http://"):
                continue
            try:
                keys = _published_keys(issuer)
            except (OSError, ValueError, KeyError) as exc:
                raise DataServerError(f"the keys of token issuer {issuer} could not be fetched "
                                      f"({exc}); is the identity provider running?") from exc
            entry = {"jwks": keys, "next_update": now + KEY_CACHE_SECONDS,
                     "expires": now + KEY_CACHE_SECONDS + 86400}
            db.execute("INSERT OR REPLACE INTO keycache VALUES (?, ?)", (issuer, json.dumps(entry)))


def renew_cache_token(config: FacilityConfig) -> None:
    """The caches' own token, renewed when it runs short; the server account owns it (the
    XRootD client uses a token file only if its own account owns it, mode 0600)."""
    if not (config.data_access.require_token and cached_regions(config)):
        return
    path = cache_token_file(config)
    if remaining_seconds(path) >= RENEW_BEFORE_SECONDS:
        return
    write_private(path, fetch_local_token(config))
    account = _run_as()
    if account:
        _give_to(path, account)


def prepare_data_access(config: FacilityConfig) -> None:
    """TLS files, the token plugin's settings and key cache, the cache's key: before the
    servers start, after the identity provider has."""
    ensure_data_tls(config)
    base = security_base(config)
    base.mkdir(parents=True, exist_ok=True)
    (base / "scitokens.cfg").write_text(scitokens_config_text(config))
    (base / "authdb").write_text("# nothing is granted here: every read needs a VO token\n")
    if config.data_access.require_token:
        seed_key_cache(config)
    renew_cache_token(config)
    account = _run_as()
    if account:
        for owned in (data_tls(config).key, *_tree(key_cache_home(config))):
            if owned.exists():
                _give_to(owned, account)


def _tree(folder: Path) -> list[Path]:
    return [folder, *folder.rglob("*")] if folder.exists() else []


def _give_to(path: Path, account: str) -> None:
    entry = pwd.getpwnam(account)
    os.chown(path, entry.pw_uid, grp.getgrgid(entry.pw_gid).gr_gid)


def _check_reachable(path: Path, account: str) -> None:
    """The unprivileged server account must be able to reach ``path``: say which folder bars it."""
    entry = pwd.getpwnam(account)
    target = path.resolve()
    for folder in [*reversed(target.parents), target]:
        info = folder.stat()
        needed = 0o001 if folder.is_dir() else 0o004
        by_group = info.st_gid == entry.pw_gid and info.st_mode & (needed << 3)
        if info.st_uid != entry.pw_uid and not by_group and not info.st_mode & needed:
            raise DataServerError(
                f"the XRootD server runs as {account!r}, which cannot enter {folder} "
                f"(mode {oct(info.st_mode & 0o777)}); put the facility home elsewhere or "
                f"allow others to traverse it (chmod o+x {folder})"
            )


def _keep_from_others(root: Path, account: str | None) -> None:
    """Files a server exports are read through it, with a token: other local accounts may not
    open the folder (the server account reads it as its group)."""
    if account:
        os.chown(root, -1, pwd.getpwnam(account).pw_gid)
        root.chmod(0o750)
    else:
        root.chmod(0o700)


def _xrootd_service(config: FacilityConfig, name: str, text: str, readable: list[Path],
                    ports: list[int], description: str, env: dict[str, str]) -> Service:
    """An xrootd process with its own folder, config file and admin folder."""
    account = _run_as()
    base = security_base(config) / name
    admin = admin_folder(config, name)
    base.mkdir(parents=True, exist_ok=True)
    _make_admin_folder(admin, base)
    cfg = base / "xrootd.cfg"
    cfg.write_text(text)
    if account:
        for owned in (base, admin):
            _give_to(owned, account)
        for path in (cfg, *readable):
            _check_reachable(path, account)
    argv = [xrootd_binary(), "-c", str(cfg), "-n", instance_name(name)]
    if account:
        argv += ["-R", account]
    return Service(name=f"xrootd-{name}", argv=argv, ports=ports, cwd=base,
                   env={"XDG_CACHE_HOME": str(key_cache_home(config)), **env},
                   description=description, start_timeout=30)


def data_server(config: FacilityConfig, region: RegionConfig) -> Service:
    """The service definition of one region's XRootD server (writes its config file)."""
    if region.serve is None:
        raise DataServerError(f"region {region.name!r} has no `serve` settings")
    root = config.region_root(region)
    root.mkdir(parents=True, exist_ok=True)
    if not (region.serve.root_dir and region.serve.root_dir.is_absolute()):
        _keep_from_others(root, _run_as())  # a folder of the facility's own (not a site's)
    text = server_config_text(config, region, admin_folder(config, region.name))
    ports = [region.serve.xrootd_port] + ([region.serve.http_port] if region.serve.http_port else [])
    return _xrootd_service(config, region.name, text, [root], ports,
                           f"XRootD server of region {region.name} serving {root}", {})


def cache_server(config: FacilityConfig, region: RegionConfig) -> Service:
    """The XCache in front of a region's server; it reads from it with its own token."""
    cache: CacheConfig | None = region.cache
    if cache is None:
        raise DataServerError(f"region {region.name!r} has no `cache` settings")
    folder = cache_dir(config, region)
    folder.mkdir(parents=True, exist_ok=True)
    account = _run_as()
    if account:
        _give_to(folder, account)
    name = f"{region.name}-cache"
    text = cache_config_text(config, region, admin_folder(config, name))
    env = {"X509_CERT_DIR": str(data_tls(config).ca_dir), "XrdSecPROTOCOL": "ztn",
           "BEARER_TOKEN_FILE": str(cache_token_file(config))}
    return _xrootd_service(config, name, text, [folder], [cache.xrootd_port],
                           f"XCache of region {region.name} in {folder}", env)


def served_regions(config: FacilityConfig) -> list[RegionConfig]:
    return [region for region in config.regions if region.serve is not None]


def cached_regions(config: FacilityConfig) -> list[RegionConfig]:
    return [region for region in served_regions(config) if region.cache is not None]
