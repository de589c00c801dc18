"""The background batch stream yields exactly the synchronous loop's batches, in order, from any
starting step; producer errors surface in the training thread; the loop logs ``data_wait``."""

from __future__ import annotations

import random
import time

import pytest
import torch

from minimind.train.loop import train
from minimind.train.prefetch import BatchStream
from minimind.train.stages import PRETRAIN
from tests.test_train_loop import _cfg, _tok, workspace  # noqa: F401  (module fixture)


def test_stream_yields_the_synchronous_batches_in_order_from_any_start():
    def make(step: int) -> list[torch.Tensor]:
        time.sleep(random.Random(step).random() * 0.005)  # uneven build times
        return [torch.arange(4) + 10 * step, torch.full((2,), step)]

    for start in (0, 7):
        stream = BatchStream(make, start, 20, depth=3)
        try:
            got = [stream.next() for _ in range(start, 20)]
        finally:
            stream.close()
        expected = [make(s) for s in range(start, 20)]
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert all(torch.equal(a, b) for a, b in zip(g, e))
        assert stream.take_wait() >= 0.0


def test_stream_reraises_the_producer_error_in_the_consumer():
    def make(step: int) -> list[int]:
        if step == 3:
            raise ValueError("data.jsonl:4: broken row")
        return [step]

    stream = BatchStream(make, 0, 10)
    assert [stream.next() for _ in range(3)] == [[0], [1], [2]]
    with pytest.raises(ValueError, match="data.jsonl:4"):
        stream.next()


def test_close_stops_a_producer_blocked_on_a_full_queue():
    stream = BatchStream(lambda s: [s], 0, 10_000, depth=1)
    assert stream.next() == [0]
    stream.close()
    assert not stream._thread.is_alive()


def test_loop_logs_data_wait_and_trains_the_same_batches_as_building_them_inline(workspace, tmp_path,  # noqa: F811
                                                                                monkeypatch):
    """The loop through the stream and the loop with the stream replaced by inline building give
    bit-identical losses (CPU): the same batches in the same order."""
    prefetched = train(PRETRAIN, _cfg(workspace, tmp_path / "a", max_steps=6), _tok(workspace))

    class Inline:
        def __init__(self, make, start, stop, **_):
            self.make, self.step = make, start

        def next(self):
            self.step += 1
            return self.make(self.step - 1)

        def take_wait(self) -> float:
            return 0.0

        def close(self) -> None:
            pass

    monkeypatch.setattr("minimind.train.core.BatchStream", Inline)
    inline = train(PRETRAIN, _cfg(workspace, tmp_path / "b", max_steps=6), _tok(workspace))
    assert prefetched.losses == inline.losses
    import json
    records = [json.loads(x) for x in prefetched.metrics_path.read_text().splitlines()]
    assert all(r["data_wait"] >= 0.0 for r in records) and len(records) == 6
