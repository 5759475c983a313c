"""One model call for the questions of requests that arrive together: the scoring script's batcher.

azmlinfsrv runs threaded gunicorn workers here (GUNICORN_CMD_ARGS="--threads N", set by
deploy_model.py and the local endpoint), so each admitted request waits in run() on a thread of its
own. run() hands its questions to the worker's one Batcher and waits for its answers. The Batcher's
single thread takes the oldest waiting request and every other waiting request with the same params,
and answers all their questions in one call of the model: the int4 model decodes them as one
onnxruntime-genai batch, so each decode step reads the weights once for all of them.

Requests are grouped by params because onnxruntime-genai's search options (sampling, temperature,
length) belong to the whole batch, not to a row; requests with other params wait for the next call.
A call runs until its longest answer ends (the runtime's batch is static on a CPU), and requests that
arrive meanwhile wait for the next call. If a call fails, its requests are answered one at a time,
so that only a failing request gets its error.

The file imports nothing of the project's and nothing but the standard library.
"""

import json
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

# Under azmlinfsrv's logger, so that its handler prints these lines in the deployment's log.
logger = logging.getLogger("azmlinfsrv.score")


@dataclass(eq=False)
class Request:
    texts: list
    params: dict | None
    future: Future = field(default_factory=Future)

    @property
    def key(self) -> str:
        """Requests with equal keys can share a call."""
        return json.dumps(self.params or {}, sort_keys=True, default=repr)


class Batcher:
    """Answers queued requests with `answer(texts, params) -> answers`, grouping those with equal params.

    `gather_s`: how long a call waits, once a request arrives at an idle batcher, for others sent at
    the same moment (clients that ask together reach run() some milliseconds apart).
    `max_rows`: the most questions one call takes, unless a single request has more.
    """

    def __init__(self, answer, gather_s: float = 0.05, max_rows: int = 16):
        self.answer, self.gather_s, self.max_rows = answer, gather_s, max_rows
        self.waiting: list[Request] = []
        self.arrived = threading.Condition()
        self.thread = threading.Thread(target=self.serve, name="batcher", daemon=True)

    def start(self) -> "Batcher":
        self.thread.start()
        return self

    def submit(self, texts: list, params: dict | None) -> Future:
        """Queue a request's questions; the future holds its answers, or the error its call raised."""
        request = Request(list(texts), params)
        with self.arrived:
            self.waiting.append(request)
            self.arrived.notify()
        return request.future

    def ask(self, texts: list, params: dict | None, timeout_s: float) -> list:
        """The answers to one request, or TimeoutError after `timeout_s`: the request then leaves the queue, or
        if its call is under way, its answers are dropped when the call ends."""
        future = self.submit(texts, params)
        try:
            return future.result(timeout=timeout_s)
        finally:  # also when azmlinfsrv's own timeout interrupts the wait
            future.cancel()

    def serve(self):
        """The batcher's thread: take a group, answer it, for as long as the worker lives."""
        while True:
            group = self.next_group()
            if group:
                self.answer_group(group)

    def next_group(self) -> list[Request]:
        """Wait for requests; take the oldest and every waiting one with its params, up to max_rows questions."""
        with self.arrived:
            idle = not self.waiting
            self.arrived.wait_for(lambda: self.waiting)
        if idle:  # after a call, whoever came meanwhile is already here
            time.sleep(self.gather_s)
        with self.arrived:
            key, group, rows, left = self.waiting[0].key, [], 0, []
            for request in self.waiting:
                if request.key == key and (not group or rows + len(request.texts) <= self.max_rows):
                    group.append(request)
                    rows += len(request.texts)
                else:
                    left.append(request)
            self.waiting = left
        # A request whose client gave up (its future cancelled) is dropped; the rest are marked as under way.
        return [request for request in group if request.future.set_running_or_notify_cancel()]

    def answer_group(self, group: list[Request]):
        """One call for the whole group; if it fails, one call per request, each keeping its own error."""
        texts = [text for request in group for text in request.texts]
        started = time.perf_counter()
        try:
            answers = self.answer(texts, group[0].params)
        except Exception as error:
            if len(group) == 1:
                return group[0].future.set_exception(error)
            logger.warning("A call for %d requests failed (%s); answering them one at a time", len(group), error)
            for request in group:
                try:
                    request.future.set_result(self.answer(request.texts, request.params))
                except Exception as own_error:
                    request.future.set_exception(own_error)
            return
        logger.info("Answered %d questions of %d requests in one call (%.1f s)", len(texts), len(group),
                    time.perf_counter() - started)
        for request in group:
            request.future.set_result(answers[: len(request.texts)])
            answers = answers[len(request.texts):]
