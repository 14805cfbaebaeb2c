"""ValidatingAdmissionPolicies evaluated as the API server would, with a CEL interpreter: the
match conditions, then the variables in order (each may use those before it), then the
validations."""

from __future__ import annotations

from typing import Any


def evaluate(policy: dict[str, Any], request: dict[str, Any], obj: dict[str, Any] | None,
             old: dict[str, Any] | None = None,
             namespace: dict[str, Any] | None = None) -> list[str] | None:
    """The messages of the validations the request fails (empty: admitted), or None when the
    policy does not apply to it (a match condition is false)."""
    import celpy

    env = celpy.Environment()

    def run(expression: str, activation: dict[str, Any]) -> Any:
        return env.program(env.compile(expression)).evaluate(activation)

    activation: dict[str, Any] = {
        "object": celpy.json_to_cel(obj), "oldObject": celpy.json_to_cel(old),
        "request": celpy.json_to_cel(request), "namespaceObject": celpy.json_to_cel(namespace)}
    if not all(run(c["expression"], activation) for c in policy["spec"].get("matchConditions", [])):
        return None
    computed: dict[Any, Any] = {}
    for variable in policy["spec"].get("variables", []):
        activation["variables"] = celpy.celtypes.MapType(computed)
        computed[celpy.celtypes.StringType(variable["name"])] = run(variable["expression"], activation)
    activation["variables"] = celpy.celtypes.MapType(computed)
    failed = []
    for check in policy["spec"]["validations"]:
        try:
            passed = bool(run(check["expression"], activation))
        except Exception:  # noqa: BLE001 (an expression that errors denies, as failurePolicy Fail)
            passed = False
        if not passed:
            failed.append(check["message"])
    return failed
