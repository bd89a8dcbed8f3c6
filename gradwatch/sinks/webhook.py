"""A sink that posts incident events to a webhook (Slack or any JSON endpoint) from a background thread, with a
rate limit. The words are :mod:`gradwatch.sinks.messages`'s."""

from __future__ import annotations

import http.client
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal
from email.utils import parsedate_to_datetime

from .._checks import check_bool, check_choice, check_int, check_number
from ._worker import Worker, close_at_exit, forget_at_exit
from . import messages
from ..alerts.alert import Severity
from ..alerts.incident import RunSummary
from .alerting import AlertSink

log = logging.getLogger("gradwatch")

__all__ = ["WebhookSink", "redact_url", "WEBHOOK_ENV"]

#: Environment variable :class:`WebhookSink` reads its URL from when none is passed.
WEBHOOK_ENV = "GRADWATCH_WEBHOOK_URL"

def redact_url(url: str) -> str:
    """``https://hooks.slack.com/…``: scheme and host only, so a webhook's secret path never reaches a log."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<webhook url>"
    return f"{parts.scheme}://{host}{port}/…"


class WebhookSink(AlertSink):
    """POST incident events to an HTTP(S) webhook from a background thread: Slack or any JSON endpoint.

    ``format="slack"`` posts ``{"text": "..."}`` (Slack / Mattermost / Discord-compatible incoming webhooks):
    one message per logging step with that step's events (opened, escalated, reminder, resolved), and one
    summary at the end of the run when it had an incident at ``min_severity`` or above. ``format="json"``
    posts one object per event (:meth:`IncidentEvent.to_dict <gradwatch.alerts.IncidentEvent.to_dict>`: ``event``,
    ``incident`` id, ``state``, ``severity``, values, message, hint) plus ``"source"`` and ``"held_back"``, so a
    receiver can update the incident rather than append; the summary as ``{"event": "summary", ...}``.

    **Rate limit**: at most ``max_per_hour`` posts in any hour; what goes over is held back, counted, and the
    next post says how many were (every event stays in ``alerts.jsonl``). Critical openings and escalations
    and the end-of-run summary are never held back.

    Delivery never blocks or raises into training: :meth:`send` only queues. The thread retries a failed
    POST (connection error, timeout, HTTP 5xx, 408, 429) up to ``retries`` times with exponential backoff
    from ``backoff`` seconds; on HTTP 429 it waits the ``Retry-After`` the server asks for (capped at
    ``max_retry_after``). Other 4xx answers are not retried. After the last try the failure is recorded
    (``gradwatch`` logger and a ``delivery_failed`` line in ``alerts.jsonl``) and the thread moves on. Posts
    are spaced by ``min_interval`` seconds (default 1.0 for Slack, whose webhooks accept about one message per
    second). At close, the queue is flushed for at most the close timeout; what is left is recorded as failed.

    The URL comes from ``url`` or the environment variable ``GRADWATCH_WEBHOOK_URL`` and is never printed or
    logged in full (only scheme and host: :func:`redact_url`).

    Args:
        url: the webhook URL (``http://`` or ``https://``); None reads ``GRADWATCH_WEBHOOK_URL``.
        format: ``"slack"`` or ``"json"``.
        timeout: seconds per HTTP request.
        retries: extra attempts after the first.
        min_severity: send alerts at least this severe (default ``"warning"``: info stays local).
        backoff: first retry delay in seconds, doubled after each failure.
        max_retry_after: longest wait honoured for a 429 ``Retry-After``.
        min_interval: seconds between posts (None: 1.0 for Slack, 0 for JSON).
        title: prefix of each message / the ``source`` field (e.g. the run name).
        queue_size: posts waiting at most; beyond, new ones are recorded as failed, not sent.
        max_per_hour: the rate limit (None: none).
        summary: post the end-of-run summary (when the run had an incident at ``min_severity`` or above).
        wait: the longest :meth:`flush` and :meth:`close` wait for queued alerts when given no timeout (what a
            monitor's ``close()`` waits for a sink it was given).
        headers: extra HTTP headers (e.g. an ``Authorization`` for a JSON endpoint).

    Raises:
        ValueError: no URL (neither ``url`` nor the environment variable), not http(s), bad ``format``.

    Example::

        sink = gradwatch.WebhookSink(format="slack")        # URL from $GRADWATCH_WEBHOOK_URL
        mon = gradwatch.Monitor(model, log_dir="runs/exp", alert_sinks=[sink])
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        format: Literal["slack", "json"] = "slack",
        timeout: float = 5.0,
        retries: int = 3,
        min_severity: Severity = "warning",
        backoff: float = 1.0,
        max_retry_after: float = 60.0,
        min_interval: float | None = None,
        title: str = "gradwatch",
        queue_size: int = 1000,
        headers: dict[str, str] | None = None,
        wait: float = 5.0,
        max_per_hour: int | None = 20,
        summary: bool = True,
    ) -> None:
        if url is None:
            url = os.environ.get(WEBHOOK_ENV) or None
            if url is None:
                raise ValueError(f"WebhookSink needs a URL: pass url= or set the environment variable {WEBHOOK_ENV}")
        if not isinstance(url, str):
            raise TypeError(f"url must be a str, got {type(url).__name__}")
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme not in ("http", "https"):
            raise ValueError(f"webhook URL must start with http:// or https://, got {redact_url(url)}")
        super().__init__(min_severity=min_severity)
        self._url = url
        self.format = check_choice(format, "format", ("slack", "json"), owner="WebhookSink")
        self.timeout = check_number(timeout, "timeout", owner="WebhookSink")
        self.retries = check_int(retries, "retries", minimum=0, owner="WebhookSink")
        self.backoff = check_number(backoff, "backoff", positive=False, owner="WebhookSink")
        self.max_retry_after = check_number(max_retry_after, "max_retry_after", positive=False, owner="WebhookSink")
        interval = check_number(min_interval, "min_interval", positive=False, allow_none=True, owner="WebhookSink")
        self.min_interval = (1.0 if format == "slack" else 0.0) if interval is None else interval
        self.title = title
        self.headers = {"Content-Type": "application/json", "User-Agent": "gradwatch-webhook"}
        self.headers.update(headers or {})
        self.post_summary = check_bool(summary, "summary", owner="WebhookSink")
        self.max_per_hour = check_int(max_per_hour, "max_per_hour", minimum=1, allow_none=True, owner="WebhookSink")
        #: Posts delivered / given up on; events held back by the rate limit.
        self.sent = 0
        self.failed = 0
        self.held = 0
        self._held_unsaid = 0  # held since the last post: said in the next one
        self._posted: deque[float] = deque()  # monotonic times of the posts of the last hour
        self._report: Callable[[str, Any, str], None] = self._log_failure
        self.queue_size = check_int(queue_size, "queue_size", minimum=1, owner="WebhookSink")
        self._closing = threading.Event()
        self._deadline: float | None = None
        self._last_post = 0.0
        self.wait = check_number(wait, "wait", positive=False, owner="WebhookSink")
        self._closed = False
        # the posting thread: a full queue drops (recorded as failed), it never waits; closed by close() below
        self._worker = Worker("gradwatch-webhook", size=self.queue_size, at_exit=False)
        close_at_exit(self, 2.0)

    # ------------------------------------------------------------------ sink protocol
    @property
    def url(self) -> str:
        """The URL, redacted (scheme and host only)."""
        return redact_url(self._url)

    def attach(self, report_failure: Callable[[str, Any, str], None]) -> None:
        """Record failed deliveries with ``report_failure(sink, event, error)`` (the monitor's: into ``alerts.jsonl``)
        instead of only logging them."""
        self._report = report_failure

    def write(self, record: Any) -> None:
        """Post the record's events: one Slack message for the step, or one JSON object per event."""
        events = [e for e in record.events if self._wants(e)]
        if events:
            self._post_events(events)

    def send(self, event: Any) -> None:
        """Post one event (or a plain :class:`~gradwatch.Alert`) on its own."""
        if self._wants(event):
            self._post_events([event])

    def send_summary(self, summary: RunSummary) -> None:
        """Post the end-of-run summary (never held back by the rate limit)."""
        if not self.post_summary:
            return
        held, self._held_unsaid = self._held_unsaid, 0
        body = (messages.json_summary if self.format == "json" else messages.slack_summary)(summary, self.title, held)
        self._enqueue(body, summary, urgent=True)

    def _post_events(self, events: Sequence[Any]) -> None:
        groups = [[e] for e in events] if self.format == "json" else [list(events)]
        for group in groups:
            urgent = any(getattr(e, "kind", "opened") in ("opened", "escalated") and e.severity == "critical"
                         for e in group)
            if not urgent and not self._room():
                self.held += len(group)
                self._held_unsaid += len(group)
                continue
            held, self._held_unsaid = self._held_unsaid, 0
            body = messages.json_body(group[0], self.title, held) if self.format == "json" \
                else messages.slack_text(group, self.title, held)
            self._enqueue(body, group[0], urgent)

    def _room(self) -> bool:
        """Whether the rate limit lets one more post through now."""
        if self.max_per_hour is None:
            return True
        now = time.monotonic()
        while self._posted and now - self._posted[0] >= 3600.0:
            self._posted.popleft()
        return len(self._posted) < self.max_per_hour

    def _enqueue(self, body: bytes, about: Any, urgent: bool) -> None:
        if self._closed:
            self._fail(about, "the sink is closed")
            return
        self._posted.append(time.monotonic())
        if not self._worker.offer(self._post, body, about):
            self._fail(about, f"queue full ({self.queue_size} posts waiting); dropped")

    @property
    def closed(self) -> bool:
        """True after :meth:`close`: alerts sent then are recorded as failed."""
        return self._closed

    def flush(self, timeout: float | None = None) -> None:
        """Wait at most ``timeout`` seconds (default ``wait``) for what is queued to be delivered (or given up
        on); the sink stays open. What a monitor does with a sink it was given, at its close."""
        self._worker.drain(max(0.0, self.wait if timeout is None else timeout))

    def close(self, timeout: float | None = None) -> None:
        """Send what is queued, waiting at most ``timeout`` seconds; record the rest as failed. Final: alerts
        sent after it are recorded as failed. A monitor never closes a sink it was given (it calls :meth:`flush`);
        gradwatch closes still-open webhook sinks at interpreter exit."""
        if self._closed:
            return
        self._closed = True
        timeout = max(0.0, self.wait if timeout is None else timeout)
        self._deadline = time.monotonic() + timeout  # the post in flight gives up (and waits no more) then
        self._closing.set()
        self._worker.close(timeout + 0.5, left=lambda body, about: self._fail(about, "not sent before the close timeout"))
        forget_at_exit(self)

    def __repr__(self) -> str:
        return f"WebhookSink({self.url!r}, format={self.format!r})"

    # ------------------------------------------------------------------ the thread
    def payload(self, event: Any) -> bytes:
        """The request body for one event (or alert) posted on its own."""
        if self.format == "json":
            return messages.json_body(event, self.title)
        return messages.slack_text([event], self.title)

    def _post(self, body: bytes, about: Any) -> None:
        """One post, on the worker's thread: every error is recorded as a failure of this post."""
        try:
            self._deliver(body, about)
        except Exception as err:  # the worker would log it with the URL in it: scrub, record, move on
            self._fail(about, f"{type(err).__name__}: {self._scrub(str(err))}")

    def _deliver(self, body: bytes, alert: Any) -> None:
        attempt = 0
        while True:
            if not self._wait(self._last_post + self.min_interval - time.monotonic()):
                self._fail(alert, "not sent before the close timeout")
                return
            timeout = self.timeout
            if self._deadline is not None:
                timeout = min(timeout, self._deadline - time.monotonic())
                if timeout <= 0:
                    self._fail(alert, "not sent before the close timeout")
                    return
            retry_after = None
            try:
                self._last_post = time.monotonic()
                req = urllib.request.Request(self._url, data=body, headers=self.headers, method="POST")
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    resp.read()
                self.sent += 1
                return
            except urllib.error.HTTPError as err:
                error = f"HTTP {err.code} {err.reason}"
                if err.code == 429:
                    retry_after = _retry_after(err.headers.get("Retry-After"))
                elif 400 <= err.code < 500 and err.code != 408:
                    self._fail(alert, error + " (not retried: the request itself was refused)")
                    return
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
                reason = getattr(err, "reason", None) or err
                error = f"{type(err).__name__}: {self._scrub(str(reason))}"
            attempt += 1
            if attempt > self.retries:
                self._fail(alert, f"{error} (after {attempt} attempts)")
                return
            delay = self.backoff * 2 ** (attempt - 1)
            if retry_after is not None:
                delay = min(retry_after, self.max_retry_after)
            if not self._wait(delay):
                self._fail(alert, f"{error}; not retried before the close timeout")
                return

    def _wait(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; False when that would pass the close deadline."""
        end = time.monotonic() + max(0.0, delay)
        while True:
            now = time.monotonic()
            if self._deadline is not None and end > self._deadline:
                return False
            if now >= end:
                return True
            if self._closing.is_set():
                time.sleep(end - now)
            else:
                self._closing.wait(end - now)  # wakes early at close to re-check the deadline

    def _fail(self, alert: Any, error: str) -> None:
        self.failed += 1
        try:
            self._report(repr(self), alert, error)
        except Exception:  # the record itself failed: keep going
            log.exception("gradwatch: could not record a webhook delivery failure")

    def _log_failure(self, sink: str, alert: Any, error: str) -> None:
        log.warning("gradwatch: alert not delivered by %s: %s", sink, error)

    def _scrub(self, text: str) -> str:
        """Remove the URL (and its path) from an error text."""
        parts = urllib.parse.urlsplit(self._url)
        for secret in (self._url, parts.path, parts.query):
            if secret and len(secret) > 1:
                text = text.replace(secret, "/…")
        return text


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
