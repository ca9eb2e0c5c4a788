"""What the fault tests (test_cp_faults.py, test_inference_faults.py) share: the injected fault and the
verdict on what every rank raised.

A scenario is (..., place, step, failing rank, action), the first fields the test's own. The failing rank
fails at ``fault_point(place, step)``: it raises (action "raise" or "oom"), or it hangs (sleeps past the
timeout, then goes on into closed connections).
"""
import time

import torch

from cpattn.faults import PeerFailure

CULPRIT_ERRORS = {"raise": "RuntimeError", "oom": "OutOfMemoryError", "bad input": "ValueError"}


def fault_hook(rank, place, step, culprit, action, timeout, fault):
    """The ``inject_faults`` hook of one scenario; records the time of the fault in ``fault["time"]``."""

    def hook(where, at):
        if rank == culprit and where == place and (step is None or at == step):
            fault["time"] = time.time()
            if action == "hang":
                time.sleep(timeout + 2)
            elif action == "oom":
                raise torch.OutOfMemoryError("injected: out of memory")
            else:
                raise RuntimeError(f"injected fault at {where} step {at}")

    return hook


def outcome(call):
    """(kind, rank named, message) of what ``call()`` raised; ("no error", None, "") if nothing."""
    try:
        call()
    except PeerFailure as exc:
        return "PeerFailure", exc.rank, str(exc)
    except Exception as exc:
        return type(exc).__name__, None, str(exc)
    return "no error", None, ""


def check_outcomes(outcomes, fault_time, culprit, action, bound, hang_collective, failed_in, label):
    """Assert the verdict of one scenario: ``outcomes[rank] = (kind, named, message, raised_at)``.

    Every rank but a hung one raised within ``bound`` seconds of the fault; the rank at fault its own
    error, the others PeerFailure naming it ("rank r failed in ``failed_in``"); after a hang, every rank
    a PeerFailure saying that ``hang_collective`` timed out."""
    assert fault_time is not None, f"{label}: the fault was never injected"
    for rank, (kind, named, message, raised_at) in enumerate(outcomes):
        where = f"{label}, rank {rank}: {kind}: {message}"
        if not (action == "hang" and rank == culprit):  # the hung rank itself comes back late, by design
            assert raised_at - fault_time < bound, f"{where}: raised {raised_at - fault_time:.1f} s after the fault"
        if action == "hang":
            # Nobody failed: the ranks that waited for the hung rank time out, naming the collective.
            assert kind == "PeerFailure", where
            assert hang_collective in message and "Timed out" in message, where
        elif rank == culprit:
            assert kind == CULPRIT_ERRORS[action], where
        else:
            assert kind == "PeerFailure" and named == culprit, where
            assert f"rank {culprit} failed in {failed_in}" in message, where
