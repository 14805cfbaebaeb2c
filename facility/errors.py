"""Errors the facility reports to people, sorted by who must act on them.

Every error a user may see derives from :class:`FacilityError`. The command line prints its
message under a headline that says whose move it is and exits with the class's own code, so a
script or a batch system can tell a broken file from a bug in the analysis from a lost
scheduler. Any other exception is a bug of the facility and keeps its traceback.

=====  ====================  ==========================================================
exit   class                 who must act
=====  ====================  ==========================================================
2      UsageError            whoever typed the command: a setting, a name, an argument
3      DataError             whoever owns the data: a file, a replica, a catalog entry
4      UserCodeError         the analysis author: the processor raised, or killed workers
5      InfrastructureError   the facility: a scheduler, a cluster or data servers lost
=====  ====================  ==========================================================
"""

from __future__ import annotations


class FacilityError(Exception):
    """An error meant for people: the message names the culprit and what to do."""

    exit_code = 1
    who = "the facility"


class UsageError(FacilityError):
    """A request that cannot be carried out as asked (setting, argument, unknown name)."""

    exit_code = 2
    who = "the request"


class DataError(FacilityError):
    """The input data is bad: unreadable, damaged or not what the catalog says."""

    exit_code = 3
    who = "the data"


class UserCodeError(FacilityError):
    """The user's own code failed (the message says where), or its chunks kill workers."""

    exit_code = 4
    who = "your code"


class InfrastructureError(FacilityError):
    """Part of the facility is down or was lost (scheduler, cluster, data servers)."""

    exit_code = 5
    who = "the facility"
