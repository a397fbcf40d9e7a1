"""dpft.rl.replay: chunk replay buffer layout, uint8 images, ring wrap-around, seeded sampling, exact round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dpft.errors import DpftError
from dpft.rl.replay import ChunkReplayBuffer

TO, DO, TA, DA, IMG = 2, 3, 4, 2, (5, 5, 3)


def _batch(b, start):
    """b transitions whose every field encodes its global id (start .. start+b-1)."""
    ids = np.arange(start, start + b, dtype=np.float64)
    obs = {"state": np.broadcast_to(ids[:, None, None], (b, TO, DO)).copy(),  # float64 from the env
           "agentview_image": np.broadcast_to((ids % 256).astype(np.uint8)[:, None, None, None, None],
                                              (b, TO) + IMG).copy()}
    nxt = {"state": obs["state"] + 0.5, "agentview_image": obs["agentview_image"] + 1}
    chunk = torch.from_numpy(np.broadcast_to(ids[:, None, None], (b, TA, DA)).copy()).float()
    return dict(obs=obs, chunk=chunk, reward=torch.from_numpy(ids * 10), next_obs=nxt,
                terminated=ids % 3 == 0, truncated=torch.from_numpy(ids % 3 == 1))


def _buffer(capacity):
    return ChunkReplayBuffer.from_example(capacity, _batch(1, 0)["obs"], _batch(1, 0)["chunk"])


def test_layout_dtypes_and_fields():
    buf = _buffer(10)
    assert buf.obs["agentview_image"].dtype == torch.uint8 and buf.obs["agentview_image"].shape == (10, TO) + IMG
    assert buf.obs["state"].dtype == torch.float32 and buf.fields["chunk"].shape == (10, TA, DA)
    buf.add(**_batch(3, 0))
    got = buf.gather(torch.tensor([1]))
    assert got["obs"]["state"].shape == (1, TO, DO) and got["obs"]["state"][0, 0, 0].item() == 1.0
    assert got["next_obs"]["state"][0, 0, 0].item() == 1.5 and got["reward"].item() == 10.0
    assert got["next_obs"]["agentview_image"].dtype == torch.uint8 and got["next_obs"]["agentview_image"].max() == 2
    assert got["truncated"].item() is True and got["terminated"].item() is False
    assert len(buf) == 3 and buf.pos == 3


def test_ring_wrap_around_keeps_the_newest_rows():
    buf = _buffer(5)
    buf.add(**_batch(3, 0))
    buf.add(**_batch(4, 3))  # ids 3..6: 3, 4 -> rows 3, 4; 5, 6 wrap to rows 0, 1
    assert len(buf) == 5 and buf.pos == 2
    assert buf.fields["chunk"][:, 0, 0].tolist() == [5.0, 6.0, 2.0, 3.0, 4.0]
    buf.add(**_batch(12, 7))  # more than capacity at once: only ids 14..18 survive, in ring order
    assert buf.pos == (2 + 12) % 5 and len(buf) == 5
    row_of = {int(c): r for r, c in enumerate(buf.fields["chunk"][:, 0, 0].tolist())}
    assert sorted(row_of) == [14, 15, 16, 17, 18]
    assert row_of[18] == (buf.pos - 1) % 5  # the newest row sits just before pos
    assert buf.obs["state"][row_of[16], 1, 2].item() == 16.0 and buf.fields["reward"][row_of[16]].item() == 160.0


def test_sampling_is_seeded_uniform_and_within_filled_rows():
    buf = _buffer(100)
    buf.add(**_batch(40, 0))
    a = buf.sample(64, torch.Generator().manual_seed(7))
    b = buf.sample(64, torch.Generator().manual_seed(7))
    assert torch.equal(a["index"], b["index"]) and torch.equal(a["obs"]["state"], b["obs"]["state"])
    assert int(a["index"].max()) < 40
    torch.testing.assert_close(a["chunk"][:, 0, 0], a["index"].float())  # rows match their index
    with pytest.raises(DpftError, match="empty"):
        _buffer(3).sample(2)


def test_state_round_trip_is_exact_after_wrap(tmp_path):
    from safetensors.torch import load_file, save_file

    buf = _buffer(6)
    buf.add(**_batch(4, 0))
    buf.add(**_batch(5, 4))  # wrapped: pos 3, size 6
    save_file(buf.state_dict(), str(tmp_path / "replay.safetensors"))
    other = _buffer(6)
    other.load_state_dict(load_file(str(tmp_path / "replay.safetensors")))
    assert (other.pos, other.size) == (3, 6)
    for name in buf.fields:
        assert torch.equal(buf.fields[name], other.fields[name]), name
    for store, other_store in ((buf.obs, other.obs), (buf.next_obs, other.next_obs)):
        for k in store:
            assert torch.equal(store[k], other_store[k]) and other_store[k].dtype == store[k].dtype
    # continuing both (adds, then seeded sampling) gives identical batches
    for x in (buf, other):
        x.add(**_batch(2, 9))
    s1, s2 = (x.sample(16, torch.Generator().manual_seed(0)) for x in (buf, other))
    assert torch.equal(s1["index"], s2["index"]) and torch.equal(s1["next_obs"]["agentview_image"],
                                                                 s2["next_obs"]["agentview_image"])


def test_partial_state_round_trip_and_errors():
    buf = _buffer(8)
    buf.add(**_batch(3, 0))
    state = buf.state_dict()
    assert state["chunk"].shape[0] == 3 and int(state["pos"]) == 3
    restored = _buffer(8)
    restored.load_state_dict(state)
    assert (restored.pos, restored.size) == (3, 3)
    assert all(torch.equal(restored.fields[k], buf.fields[k]) for k in buf.fields)
    with pytest.raises(DpftError, match="capacity=8"):
        _buffer(9).load_state_dict(state)
    bad = dict(state)
    bad.pop("obs/state")
    with pytest.raises(DpftError, match="keys"):
        _buffer(8).load_state_dict(bad)
    tr = _batch(2, 0)
    tr["obs"] = dict(tr["obs"], agentview_image=tr["obs"]["agentview_image"].astype(np.float32))
    with pytest.raises(DpftError, match="stored as uint8"):
        buf.add(**tr)
    tr = _batch(2, 0)
    tr["reward"] = tr["reward"][:1]
    with pytest.raises(DpftError, match=r"reward has shape \(1,\), expected \(2,\)"):
        buf.add(**tr)
