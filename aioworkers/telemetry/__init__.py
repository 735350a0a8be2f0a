"""OpenTelemetry metrics and traces: the one package that uses the OpenTelemetry API.

Only the API is needed at run time. Whether a real (SDK) provider is configured is
checked when a worker is built and once per enqueue batch, never per job: with none
configured `Telemetry.for_worker` and `Telemetry.producer` return ``None`` and the
runtime skips every call on its hot path.

| module | holds |
|---|---|
| `config` | `Telemetry` (which providers), provider detection, `messaging_system` |
| `conventions` | the scope and attribute names |
| `metrics` | the instruments of one MeterProvider and the counts they read |
| `producer` | the producer spans and sent counter of one enqueue batch |
| `worker` | `WorkerTelemetry`: one worker's job metrics, consumer spans, lease counters |

Every instrument carries ``messaging.system`` and ``messaging.destination.name`` (the
queue); besides those:

| instrument | kind | unit | more attributes |
|---|---|---|---|
| ``messaging.client.sent.messages`` | counter | {message} | operation ``send``, error.type |
| ``messaging.client.consumed.messages`` | counter | {message} | operation ``receive`` |
| ``messaging.process.duration`` | histogram | s | operation ``process``, task, error.type |
| ``aioworkers.jobs`` | counter | {job} | task, ``aioworkers.job.outcome`` |
| ``aioworkers.queue.lag`` | gauge | s | |
| ``aioworkers.jobs.in_flight`` | gauge | {job} | |
| ``aioworkers.queue.depth`` | gauge | {job} | ``aioworkers.queue.state`` |
| ``aioworkers.lease.extensions`` | counter | {lease} | |
| ``aioworkers.lease.lost`` | counter | {lease} | |

Histograms are recorded in a context with no valid span, so the SDK samples no exemplar
for them (which would cost as much again as the record itself).
"""

from .._runtime.outcome import OUTCOMES
from .config import Telemetry, messaging_system
from .producer import Producer
from .worker import WorkerTelemetry

__all__ = ["OUTCOMES", "Producer", "Telemetry", "WorkerTelemetry", "messaging_system"]
