"""JupyterHub for the facility: VO login, profiles by VO group, servers wired to the facility.

``facility.hub.config.configure(c)`` is the whole hub configuration, for the embedded facility
and for the Helm chart alike.
"""
