"""SphinxX on the debug flavours: loss, aux loss, image scattering, batched generation."""

import numpy as np
import pytest
import torch
from PIL import Image

from models.conversation import image_token_id, tokenize_conversation, train_bpe_tokenizer
from models.errors import UserError
from models.flavours import from_name
from models.sphinx import IGNORE_INDEX, SphinxX
from models.tiling import TileSpec, tile_image



TEXTS = ["What colour is the square? It is red.", "How many circles are there? Three circles.",
         "Read the word: apple banana cherry."] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, vocab_size=320)


def _model(name, tokenizer, seed=0):
    torch.manual_seed(seed)
    return SphinxX.from_flavour(from_name(name), tokenizer)


@pytest.fixture(scope="module")
def dense(tokenizer):
    return _model("debug", tokenizer)


@pytest.fixture(scope="module")
def moe(tokenizer):
    return _model("debug-moe", tokenizer)


def _image(w, h, colour=(200, 30, 30)):
    return Image.new("RGB", (w, h), colour)


def _batch(tokenizer, flavour, sizes, max_seq_len=1024):
    """Samples with one image each (sizes: list of (W, H) or None), right-padded to one tensor batch."""
    spec = TileSpec.from_flavour(flavour)
    rows, views, kept = [], [], []
    for i, size in enumerate(sizes):
        conv = [{"from": "human", "value": ("<image>\n" if size else "") + "What colour is the square?"},
                {"from": "gpt", "value": "It is red."}]
        n_tokens = []
        if size:
            t = tile_image(_image(*size), spec)
            views.append(t.views)
            kept.append(t.kept)
            n_tokens = [(1 + t.n_kept) * (flavour.tokens_per_view + 2) + t.n_skipped]
        rows.append(tokenize_conversation(conv, tokenizer, image_tokens=n_tokens, max_seq_len=max_seq_len))
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r.input_ids)] = torch.tensor(r.input_ids)
        labels[i, :len(r.labels)] = torch.tensor(r.labels)
        mask[i, :len(r.input_ids)] = 1
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if views:
        batch["views"] = torch.from_numpy(np.concatenate(views))
        batch["kept"] = torch.from_numpy(np.stack(kept))
    return batch


@pytest.mark.parametrize("name", ["debug", "debug-moe"])
def test_forward_backward(name, tokenizer, request):
    model = request.getfixturevalue("dense" if name == "debug" else "moe")
    model.train()
    model.zero_grad()
    out = model(**_batch(tokenizer, model.flavour, [(96, 96), (200, 60), None]))
    assert torch.isfinite(out.loss) and out.logits.shape[-1] == model.vocab_size
    if model.is_moe:
        assert out.aux_loss.item() > 0
        assert out.loss.item() == pytest.approx((out.lm_loss + 0.01 * out.aux_loss).item(), rel=1e-5)
    else:
        assert out.aux_loss.item() == 0 and out.loss.item() == out.lm_loss.item()
    out.loss.backward()
    assert model.vision.projector[0].weight.grad.abs().sum() > 0
    assert model.vision.start.grad.abs().sum() > 0 and model.vision.skip.grad.abs().sum() > 0
    assert model.llm.get_input_embeddings().weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.vision.convnext.parameters())  # frozen encoders
    assert not model.vision.dino.training
    model.eval()



def test_text_only_batch_gives_every_trainable_vision_param_a_zero_grad(dense, tokenizer):
    """No images in the batch: the vision module still runs inside its own forward and every
    trainable vision parameter gets an all-zero grad (data-parallel reduction needs them on every rank)."""
    dense.train()
    dense.zero_grad(set_to_none=True)
    ran = []
    hook = dense.vision.register_forward_hook(lambda m, a, o: ran.append(o.shape))
    try:
        out = dense(**_batch(tokenizer, dense.flavour, [None, None]))
    finally:
        hook.remove()
    out.loss.backward()
    assert ran == [(0, dense.llm.config.hidden_size)]
    trainable = {n: p for n, p in dense.vision.named_parameters() if p.requires_grad}
    assert {"start", "end", "skip", "projector.0.weight", "projector.1.bias"} <= set(trainable)
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, missing
    assert all(torch.count_nonzero(p.grad) == 0 for p in trainable.values())
    assert dense.llm.get_input_embeddings().weight.grad.abs().sum() > 0
    dense.zero_grad(set_to_none=True)
    dense.eval()

def test_loss_only_on_assistant_spans(dense, tokenizer):
    batch = _batch(tokenizer, dense.flavour, [(96, 48), None])
    with torch.no_grad():
        out = dense(**batch)
        # the loss is exactly the mean CE over the supervised (assistant) targets
        logits, targets = out.logits[:, :-1], batch["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
        ref = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
        assert out.lm_loss == pytest.approx(float(ref), rel=1e-5) and out.num_tokens == int(keep.sum())
        # a prompt token's label (-100) carries no loss: changing it to a real id changes nothing
        # if it stays ignored, and changes the loss once supervised
        prompt_pos = int((batch["labels"][1] == IGNORE_INDEX).nonzero()[3])
        moved = {**batch, "input_ids": batch["input_ids"].clone()}
        pad_pos = int((batch["attention_mask"][1] == 0).nonzero()[0]) if (batch["attention_mask"][1] == 0).any() else None
        if pad_pos is not None:  # tokens after the end (padding, label -100) do not move the loss
            moved["input_ids"][1, pad_pos] = 7
            assert dense(**moved).lm_loss == pytest.approx(float(out.lm_loss), abs=1e-6)
        supervised = {**batch, "labels": batch["labels"].clone()}
        supervised["labels"][1, prompt_pos] = int(batch["input_ids"][1, prompt_pos])
        assert dense(**supervised).lm_loss != pytest.approx(float(out.lm_loss), abs=1e-6)
        # all-ignored labels: zero loss, no targets
        nothing = dense(**{**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)})
        assert nothing.lm_loss == 0 and nothing.num_tokens == 0


def test_image_token_count_mismatch_is_a_clear_error(dense, tokenizer):
    batch = _batch(tokenizer, dense.flavour, [(96, 96)])
    batch["input_ids"][0, torch.nonzero(batch["input_ids"][0] == image_token_id(tokenizer))[0]] = 9
    with pytest.raises(UserError, match="image token count mismatch"):
        dense(**batch)
    no_views = _batch(tokenizer, dense.flavour, [(96, 96)])
    del no_views["views"], no_views["kept"]
    with pytest.raises(UserError, match="no images"):
        dense(**no_views)


def test_wide_image_uses_fewer_tokens_than_without_skipping(dense, tokenizer):
    n = dense.flavour.tokens_per_view
    square = _batch(tokenizer, dense.flavour, [(96, 96)])
    wide = _batch(tokenizer, dense.flavour, [(192, 48)])  # 4:1 -> only the top row of tiles kept
    img = image_token_id(tokenizer)
    assert int((square["input_ids"] == img).sum()) == 5 * (n + 2)
    assert int((wide["input_ids"] == img).sum()) == 3 * (n + 2) + 2
    assert wide["views"].shape[0] == 3  # the two padded tiles never reach the encoders
    with torch.no_grad():
        assert torch.isfinite(dense(**wide).loss)


def _prompts(tokenizer, dense):
    spec = TileSpec.from_flavour(dense.flavour)
    t = tile_image(_image(150, 60), spec)
    n = (1 + t.n_kept) * (dense.flavour.tokens_per_view + 2) + t.n_skipped
    img = image_token_id(tokenizer)
    prompts = [tokenizer.encode("What colour is"), [img] * n + tokenizer.encode("How many"), [5, 6, 7, 8, 9, 10, 11]]
    return prompts, torch.from_numpy(t.views), torch.from_numpy(t.kept)[None]


def test_greedy_with_and_without_kv_cache_agree(dense, tokenizer):
    prompts, views, kept = _prompts(tokenizer, dense)
    cached = dense.generate(prompts, views, kept, max_new_tokens=8, eos_token_id=-1)
    full = dense.generate(prompts, views, kept, max_new_tokens=8, eos_token_id=-1, use_cache=False)
    assert cached == full and all(len(x) == 8 for x in cached)
    # left padding does not change a sequence's answer
    alone = dense.generate(prompts[2:], max_new_tokens=8, eos_token_id=-1)
    assert alone[0] == cached[2]


def test_moe_generation_runs(moe, tokenizer):
    prompts, views, kept = _prompts(tokenizer, moe)
    out = moe.generate(prompts, views, kept, max_new_tokens=[3, 4, 5], eos_token_id=-1)
    assert [len(x) for x in out] == [3, 4, 5]


def test_per_sequence_eos_and_max_new_tokens(dense, tokenizer):
    prompts, views, kept = _prompts(tokenizer, dense)
    free = dense.generate(prompts, views, kept, max_new_tokens=6, eos_token_id=-1)
    # each sequence stops at its own max_new_tokens, with the tokens it had in the longer run
    assert dense.generate(prompts, views, kept, max_new_tokens=[6, 2, 5], eos_token_id=-1) == [
        free[0], free[1][:2], free[2][:5]]
    # eos ends a sequence and is kept as its last token (the others go on); max_new_tokens 0 gives nothing
    stop = free[0][2]
    assert dense.generate(prompts, views, kept, max_new_tokens=6, eos_token_id=stop) == [
        f[:f.index(stop) + 1] if stop in f else f for f in free]
    eos_first = dense.generate(prompts[:1], max_new_tokens=6, eos_token_id=free[0][0])
    assert eos_first == [[free[0][0]]]
    assert dense.generate(prompts[:2], views, kept, max_new_tokens=[0, 1], eos_token_id=-1) == [[], free[1][:1]]
    with pytest.raises(TypeError):  # greedy only: sampling is vLLM's
        dense.generate(prompts[:1], max_new_tokens=2, temperature=0.7)


# ---------------------------------------------------------------- packing


def _packed(batch, pad_to=None, pad_token_id=0):
    """The right-padded rows of ``batch`` as ONE packed row: real tokens concatenated, positions
    restarting per sample (padding one more run), each sample's first label -100."""
    lens = batch["attention_mask"].sum(1).tolist()
    ids = torch.cat([batch["input_ids"][i, :n] for i, n in enumerate(lens)])
    labels = torch.cat([batch["labels"][i, :n] for i, n in enumerate(lens)])
    starts = [sum(lens[:i]) for i in range(len(lens))]
    labels[starts] = IGNORE_INDEX
    runs = lens + ([pad_to - len(ids)] if pad_to and pad_to > len(ids) else [])
    pos = torch.cat([torch.arange(n) for n in runs])
    if pad_to and pad_to > len(ids):
        ids = torch.cat([ids, torch.full((pad_to - len(ids),), pad_token_id)])
        labels = torch.cat([labels, torch.full((pad_to - len(labels),), IGNORE_INDEX)])
    out = dict(input_ids=ids[None], attention_mask=(torch.arange(len(ids)) < sum(lens)).long()[None],
               labels=labels[None], position_ids=pos[None])
    for k in ("views", "kept"):
        if k in batch:
            out[k] = batch[k]
    return out, lens


@pytest.mark.parametrize("name", ["debug", "debug-moe"])
def test_packed_row_confines_attention_to_each_sample(name, tokenizer, request):
    """Three samples (two with images) in one packed row give each sample exactly the logits it
    gets alone in a padded batch, and the same token-mean loss: no attention across samples."""
    model = request.getfixturevalue("dense" if name == "debug" else "moe").eval()
    batch = _batch(tokenizer, model.flavour, [(96, 96), None, (200, 60)])
    packed, lens = _packed(batch, pad_to=int(batch["attention_mask"].sum()) + 7)
    with torch.no_grad():
        plain = model(**batch)
        mine = model(**packed)
    start = 0
    for i, n in enumerate(lens):
        torch.testing.assert_close(mine.logits[0, start:start + n], plain.logits[i, :n], atol=2e-5, rtol=1e-4)
        start += n
    assert mine.num_tokens == plain.num_tokens
    torch.testing.assert_close(mine.lm_loss, plain.lm_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine.aux_loss, plain.aux_loss, atol=1e-5, rtol=1e-5)  # real tokens only
    # without the restarts the same row attends across samples: the check above can fail
    with torch.no_grad():
        leaky = model(**{**packed, "position_ids": None})
    assert (leaky.logits[0, lens[0]:lens[0] + lens[1]] - plain.logits[1, :lens[1]]).abs().max() > 1e-3


def test_packed_training_follows_the_unpacked_loss_curve(tokenizer):
    """Five AdamW steps on the same samples, packed vs padded: the same losses step by step."""
    batch = _batch(tokenizer, from_name("debug"), [(96, 96), None, (200, 60), (64, 120)])
    packed, _ = _packed(batch, pad_to=int(batch["attention_mask"].sum()) + 3)
    curves = []
    for inputs in (batch, packed):
        model = _model("debug", tokenizer, seed=3).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        curve = []
        for _ in range(5):
            opt.zero_grad()
            loss = model(**inputs).loss
            loss.backward()
            opt.step()
            curve.append(float(loss.detach()))
        curves.append(curve)
    assert curves[0][-1] < curves[0][0]  # it learns
    np.testing.assert_allclose(curves[1], curves[0], rtol=2e-4, atol=2e-4)
