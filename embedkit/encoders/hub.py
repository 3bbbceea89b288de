"""This machine first, the Hugging Face hub only when it answers at once.

A clinic laptop is often offline, and huggingface_hub on a machine without a network retries each
request five times with back-off (about 40 s and a dozen log lines per file) before it gives up.
So a hub model is looked for on this machine first (a local folder, the model store, the Hugging
Face cache: `cached_folder`), and loaded from that folder, which makes no network call at all.
Only a model found nowhere here makes us ask the hub, and only after one quick probe
(HUB_TIMEOUT_S) says it answers: otherwise the user gets one line saying where to get the model,
at once.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

HUB_TIMEOUT_S = 2.0  # how long the probe waits for any answer from the hub (EMBEDKIT_HUB_TIMEOUT overrides)
# endpoint -> "answered", "refused" (failed before the timeout: refused, no DNS) or "silent"; one probe per process
_PROBE: dict[str, str] = {}


def offline() -> bool:
    """HF_HUB_OFFLINE (or transformers' TRANSFORMERS_OFFLINE) is set: never ask the hub."""
    return any(os.environ.get(k, "0") not in ("0", "", "false", "False") for k in ("HF_HUB_OFFLINE",
                                                                                      "TRANSFORMERS_OFFLINE"))


def cached_folder(source: str, revision: str | None = None) -> str | None:
    """The snapshot folder of `source` in the Hugging Face cache (at `revision`, default the cached main), when its
    config.json is there. Read from the filesystem only: loading from this folder asks the hub nothing, where
    huggingface_hub's own download functions build request headers first, and that alone may go to the network
    (its agent registry), even with local_files_only."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(source, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - an id the hub would refuse is simply not cached
        return None
    return str(Path(hit).parent) if isinstance(hit, str) else None


def quiet_hub() -> None:
    """huggingface_hub logs every retry as a warning ("Retrying in 8s [Retry 4/5]"); its failure reaches the user
    as our one line instead."""
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()


def hub_timeout() -> float:
    try:
        return float(os.environ.get("EMBEDKIT_HUB_TIMEOUT", HUB_TIMEOUT_S))
    except ValueError:
        return HUB_TIMEOUT_S


def hub_probe(timeout: float | None = None) -> str:
    """"answered", "refused" or "silent": the hub's response to one HEAD request, asked once per process.

    The request runs in a daemon thread so that a DNS lookup that hangs (getaddrinfo has no timeout)
    cannot hold the user longer than `timeout`; any HTTP status counts as an answer."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    endpoint = constants.ENDPOINT
    if endpoint in _PROBE:
        return _PROBE[endpoint]
    wait = hub_timeout() if timeout is None else timeout
    done, answered = threading.Event(), []

    def probe():
        try:
            # its own timeout outlasts the wait: a hub that hangs is "silent", never "refused"
            get_session().head(endpoint, timeout=2 * wait)
            answered.append(True)
        except Exception:  # noqa: BLE001 - no answer is the answer
            pass
        finally:
            done.set()  # a refused connection or a failed lookup ends the wait at once

    threading.Thread(target=probe, daemon=True, name="embedkit-hub-probe").start()
    finished = done.wait(wait)
    _PROBE[endpoint] = "answered" if answered else "refused" if finished else "silent"
    return _PROBE[endpoint]


def require_hub(source: str, name: str | None = None) -> None:
    """Called before a model found nowhere here is fetched: fail at once, in one line, when the hub cannot
    be asked (HF_HUB_OFFLINE) or does not answer within the probe's timeout."""
    from embedkit.errors import EmbedkitError

    if offline():
        raise EmbedkitError(missing_model_message(source, name, "HF_HUB_OFFLINE is set"))
    state = hub_probe()
    if state != "answered":
        why = ("the Hugging Face hub cannot be reached from here" if state == "refused"
               else f"the Hugging Face hub did not answer within {hub_timeout():g} s")
        raise EmbedkitError(missing_model_message(source, name, why))
    quiet_hub()


def missing_model_message(source: str, name: str | None = None, why: str | None = None) -> str:
    """One line: the model is not here, why the hub was not asked, and the commands that bring it here."""
    label = name if name and name != source else source
    tar = f"{label.replace('/', '--')}.tar"
    because = f" and {why}" if why else ""
    return (f"model '{source}' is not available on this machine{because}: on a connected machine run "
            f"`hf download {source} && embedkit models pack {label} --out {tar}`, copy {tar} here and run "
            f"`embedkit models install {tar}` (or pass a local folder saved with save_pretrained); "
            f"`embedkit models` lists what is here")
