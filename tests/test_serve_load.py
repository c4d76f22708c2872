"""The load test's bookkeeping (`bench/serve_load.py`): the tokens counted while the clients were sending."""

from __future__ import annotations

import pytest

from bench import serve_load


def record(at, first, total, tokens, error=None):
    return dict(at=at, first=first, total=total, tokens=tokens, error=error)


def test_tokens_while_sending_counts_each_request_by_its_share_of_the_window():
    records = [
        record(0.0, 1.0, 5.0, 100),  # inside the first 10 s: all of it
        record(8.0, 1.0, 5.0, 100),  # streams from 9 to 13 s: a quarter of it before 10 s
        record(11.0, 0.5, 2.0, 100),  # sent after the clients stopped (cannot be): none
        record(2.0, 0.5, 3.0, 100, error="HTTP 500"),  # failed: none
        record(9.5, 0.2, 0.2, 1),  # one token, at 9.7 s
        record(9.9, 0.2, 0.2, 1),  # one token, at 10.1 s
    ]
    assert serve_load.tokens_while_sending(records, 10.0) == pytest.approx(100 + 25 + 1)


def test_a_load_reports_both_rates():
    records = [record(0.0, 0.5, 4.5, 80), record(4.0, 0.5, 8.5, 80)]  # the second streams from 4.5 to 12.5 s
    jobs = [dict(max_tokens=80)]
    summary = serve_load.summarise([dict(r, job=0, status=200, answer="") for r in records], 8.5, jobs, {}, 6.0)
    assert summary["tokens_per_s"] == pytest.approx(160 / 8.5, abs=0.1)
    assert summary["sending_tokens_per_s"] == pytest.approx((80 + 80 * 1.5 / 8.0) / 6.0, abs=0.1)


def test_thread_cpu_seconds_counts_a_busy_thread_by_its_name():
    import sys
    import threading
    import time

    if not sys.platform.startswith("linux"):
        pytest.skip("reads Linux's /proc")
    spun, release, used = threading.Event(), threading.Event(), []

    def spin():  # use 0.3 s of CPU, whatever else the machine is doing, then idle
        while time.thread_time() < 0.3:
            pass
        used.append(time.thread_time())
        spun.set()
        release.wait()

    thread = threading.Thread(target=spin, name="spinner")
    thread.start()
    spun.wait()
    seen = serve_load.thread_cpu_seconds()["spinner"]
    release.set()
    thread.join()
    assert seen == pytest.approx(used[0], abs=0.05)  # /proc counts in ticks of 10 ms


def test_a_client_reads_streamed_and_whole_responses_alike():
    """The load test's client against a real server: a streamed and a whole response to one question
    carry the same answer and token count, and only the streamed one sees its first token early."""
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    from serving import running

    import nano
    from demos.workstation.server import create_app

    model = nano.load("nano-tiny", device="cpu")
    app = create_app(model, "model", max_batch=2, default_max_tokens=64)
    job = dict(index=0, messages=[{"role": "user", "content": "What is 345 - 67?"}], max_tokens=64, budget=None)
    with running(app) as url:
        host, port = url.removeprefix("http://").split(":")
        streamed = serve_load._one_request(host, int(port), job)
        whole = serve_load._one_request(host, int(port), dict(job, stream=False))
    expected = nano.generate(model, job["messages"], max_new_tokens=64)
    for record in (streamed, whole):
        assert record["error"] is None and record["status"] == 200
        assert record["answer"] == expected.answer
    assert expected.answer.strip()
    assert streamed["tokens"] == whole["tokens"] > 0
    assert whole["first"] == pytest.approx(whole["total"], abs=0.05)
