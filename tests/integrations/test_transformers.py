"""GradWatchTrainerCallback in a real ``transformers.Trainer`` on a tiny GPT-2 (CPU, a dozen steps): values equal an
independent reference at the same steps, before clipping; accumulation; bf16; TensorBoard read back; resume;
a planted detached skip; ``on_critical="stop"``."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers import read_events
from helpers.processes import spawn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gradwatch.integrations.transformers import STATE_FILE, GradWatchTrainerCallback  # noqa: E402


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=3, n_head=2, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def dataset(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, 16), generator=g)
    return [{"input_ids": x, "labels": x} for x in ids]


def trainer(tmp_path, model, callbacks, **kw):
    args = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, max_steps=8,
                logging_steps=4, learning_rate=5e-3, report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
                data_seed=0, dataloader_num_workers=0)
    args.update(kw)
    return transformers.Trainer(model=model, args=transformers.TrainingArguments(**args), train_dataset=dataset(),
                                callbacks=callbacks)


class Reference(transformers.TrainerCallback):
    """Per-layer gradient norms computed independently at ``on_pre_optimizer_step`` (after accumulation)."""

    def __init__(self, steps):
        self.steps, self.got = set(steps), {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        step = state.global_step + 1
        if step not in self.steps:
            return
        seen, out = set(), {}
        for name, module in model.named_modules():
            grads = [p.grad for p in module.parameters(recurse=False)
                     if p.requires_grad and p.grad is not None and id(p) not in seen]
            seen.update(id(p) for p in module.parameters(recurse=False))
            if grads:
                out[name] = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
        out["_global"] = math.sqrt(sum(v * v for v in out.values()))
        self.got[step] = out


def grad_norms(cb, step):
    rec = next(r for r in cb.monitor.records if r.step == step)
    return {n: rec.value(n, "grad_norm") for n in rec.layers} | {"_global": rec.global_value("grad_norm")}


def test_values_equal_an_independent_reference_at_the_trainers_logging_steps(tmp_path):
    cb, ref = GradWatchTrainerCallback(), Reference({1, 4, 8})
    run = trainer(tmp_path, tiny_gpt2(), [ref, cb], max_grad_norm=0.0, report_to=["tensorboard"])
    run.train()
    assert [r.step for r in cb.monitor.records] == [1, 4, 8]  # the first step, then logging_steps=4
    for step in (1, 4, 8):
        got, want = grad_norms(cb, step), ref.got[step]
        assert set(got) == set(want)
        for name in want:
            assert got[name] == pytest.approx(want[name], rel=1e-4), (step, name)
    scalars = read_events(os.path.join(tmp_path, "runs", "gradwatch"))["scalars"]
    assert sorted(scalars["zz_gradwatch.layers/grad_norm/_global"]) == [1, 4, 8]
    series = read_events(os.path.join(tmp_path, "runs", "gradwatch"))["series"]
    assert any(tag.startswith("zz_gradwatch.blocks/skip_share/transformer.h.") for tag in series)  # block flow found GPT-2's merges
    # the Trainer hands a callback its loss only in on_log (the mean over logging_steps), after the step's
    # measurement: record 8 carries the loss logged at step 4, record 4 none yet
    logged = {h["step"]: h["loss"] for h in run.state.log_history if "loss" in h}
    loss = {r.step: r.loss for r in cb.monitor.records}
    assert loss[1] is None and loss[4] is None and loss[8] == pytest.approx(logged[4])


def test_values_are_before_clipping(tmp_path):
    """Step 1 sees the same gradients with and without clipping (same seed, same batch): gradwatch must report
    the unclipped values in both runs although the Trainer clipped them to norm 0.01 before any callback."""
    plain, clipped = GradWatchTrainerCallback(), GradWatchTrainerCallback()
    trainer(tmp_path / "a", tiny_gpt2(), [plain], max_grad_norm=0.0, max_steps=1).train()
    trainer(tmp_path / "b", tiny_gpt2(), [clipped], max_grad_norm=0.01, max_steps=1).train()
    a, b = grad_norms(plain, 1), grad_norms(clipped, 1)
    assert a["_global"] > 1.0  # far above 0.01: the clipped run really was clipped
    for name in a:
        assert b[name] == pytest.approx(a[name], rel=1e-4), name


def test_gradient_accumulation_and_bf16(tmp_path):
    cb, ref = GradWatchTrainerCallback(every=2), Reference({1, 2, 4})
    trainer(tmp_path, tiny_gpt2(), [ref, cb], gradient_accumulation_steps=2, max_steps=4, max_grad_norm=0.0,
            bf16=True, per_device_train_batch_size=2).train()
    assert [r.step for r in cb.monitor.records] == [1, 2, 4]
    for step in (1, 2, 4):
        got, want = grad_norms(cb, step), ref.got[step]
        assert got["_global"] == pytest.approx(want["_global"], rel=1e-3)
        assert all(math.isfinite(v) for v in got.values())


def test_resume_from_a_checkpoint_keeps_the_monitor_state(tmp_path):
    first = GradWatchTrainerCallback()
    trainer(tmp_path, tiny_gpt2(), [first], save_strategy="steps", save_steps=4).train()
    saved = os.path.join(tmp_path, "checkpoint-4", STATE_FILE)
    assert os.path.isfile(saved) and json.load(open(saved))["step"] == 5
    second = GradWatchTrainerCallback()
    trainer(tmp_path, tiny_gpt2(), [second], save_strategy="steps", save_steps=4).train(
        resume_from_checkpoint=os.path.join(tmp_path, "checkpoint-4"))
    assert [r.step for r in second.monitor.records] == [8]  # only the resumed steps, on the same axis
    assert second.monitor.global_step == 9


def _detach_skip(model, block: int, after: int = 0):
    """From the ``after``-th forward on, cut the first residual skip of ``transformer.h.<block>``: the block sees
    a detached input, its attention branch the attached one (a forward pre-hook on the block, another on its
    ln_1). A skip dead from the very first step is invisible to discovery (nothing flows through it to find:
    ``docs/flow.md``), so the fault is planted after the first steps, as a bug introduced mid-run would be."""
    h = model.transformer.h[block]
    stash = {"n": 0}

    def block_pre(mod, args, kwargs):
        stash["n"] += 1
        stash["x"] = args[0] if args else kwargs["hidden_states"]
        if stash["n"] <= after:
            return None
        if args:
            return (args[0].detach(), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}

    h.register_forward_pre_hook(block_pre, with_kwargs=True)
    h.ln_1.register_forward_pre_hook(lambda mod, args: (stash["x"],))


def test_a_detached_skip_fires_skip_collapse_naming_the_block_and_can_stop_training(tmp_path):
    model = tiny_gpt2()
    _detach_skip(model, 1, after=2)
    got = []
    cb = GradWatchTrainerCallback(every=1, on_critical="stop", alert_sinks=[got.append],
                                  rules={"skip_collapse": {"critical": 1e-6}})
    t = trainer(tmp_path, model, [cb], max_steps=12, max_grad_norm=0.0)
    t.train()
    hits = [e for e in got if e.rule == "skip_collapse"]
    assert hits and hits[0].name.startswith("transformer.h.1") and hits[0].severity == "critical"
    assert t.state.global_step == hits[0].step < 12  # stopped right after the critical step


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing(tmp_path, reentrant, caplog):
    """Parameter metrics are exact either way; block flow sees the non-reentrant recompute, and says when
    reentrant checkpointing hides the blocks (``docs/flow.md``)."""
    cb, ref = GradWatchTrainerCallback(every=2), Reference({1, 2, 4})
    trainer(tmp_path, tiny_gpt2(), [ref, cb], max_steps=4, max_grad_norm=0.0, gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": reentrant}).train()
    for step in (1, 2, 4):
        assert grad_norms(cb, step)["_global"] == pytest.approx(ref.got[step]["_global"], rel=1e-4)
    blocks = cb.monitor.latest.blocks
    if reentrant:
        assert not blocks and "reentrant" in caplog.text  # said once, with the fix
    else:
        assert len(blocks) == 6  # two merges in each of the 3 GPT-2 blocks


@pytest.mark.slow
def test_torch_compile(tmp_path):
    """``torch_compile=True`` (dynamo with the ``eager`` backend, to keep CI fast): parameter metrics exact, no
    error; block flow behaves as ``docs/flow.md`` says for compiled models."""
    cb, ref = GradWatchTrainerCallback(every=2), Reference({1, 2, 4})
    trainer(tmp_path, tiny_gpt2(), [ref, cb], max_steps=4, max_grad_norm=0.0, torch_compile=True,
            torch_compile_backend="eager").train()
    for step in (1, 2, 4):
        assert grad_norms(cb, step)["_global"] == pytest.approx(ref.got[step]["_global"], rel=1e-4)
    assert cb.monitor.errors == []


class _Logged(transformers.TrainerCallback):
    """The Trainer's own ``grad_norm`` log: the norm of the averaged gradients, before clipping."""

    def __init__(self):
        self.grad_norm = {}

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "grad_norm" in logs:
            self.grad_norm[state.global_step] = float(logs["grad_norm"])


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    cb, ref, logged = GradWatchTrainerCallback(every=2), Reference({1, 2, 4}), _Logged()
    trainer(out, tiny_gpt2(), [ref, cb, logged], max_steps=4, max_grad_norm=1.0, ddp_backend="gloo",
            logging_steps=2).train()
    got = {r.step: r.global_value("grad_norm") for r in cb.monitor.records}
    with open(os.path.join(out, f"result{rank}.json"), "w") as f:
        json.dump({"got": got, "blocks": len(cb.monitor.latest.blocks), "logged": logged.grad_norm}, f)


@pytest.mark.slow
def test_ddp_two_processes_agree_and_rank0_writes(tmp_path):
    """Two real processes (gloo) as ``torchrun`` would start them: the same values on both ranks (gradients
    all-reduced; block flow averaged over ranks), one event file, by rank 0."""
    from helpers.webhook_server import free_port

    spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    res = [json.load(open(tmp_path / f"result{r}.json")) for r in (0, 1)]
    assert sorted(res[0]["got"]) == ["1", "2", "4"] and res[0]["blocks"] == res[1]["blocks"] == 6
    for step in res[0]["got"]:
        assert res[0]["got"][step] == pytest.approx(res[1]["got"][step], rel=1e-6)
    # the clip factor is undone against the averaged gradient, not this rank's own (each rank read its own
    # gradient before DDP averaged it, and reported its own wrong values, 1.51 and 1.57 for 1.0 clipped)
    for step, value in res[0]["logged"].items():
        assert res[0]["got"][step] == pytest.approx(value, rel=1e-4), (step, res[0]["got"], res[0]["logged"])
    assert len(list((tmp_path / "runs" / "gradwatch").glob("events.out.tfevents.*"))) == 1


def test_attached_first_the_reporters_receive_the_whole_model_values(tmp_path):
    class Reporter(transformers.TrainerCallback):  # what wandb's or MLflow's callback sees in on_log
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append((state.global_step, dict(logs)))

    reporter = Reporter()
    t = trainer(tmp_path, tiny_gpt2(), [reporter], max_grad_norm=0.0)
    cb = GradWatchTrainerCallback().attach(t)
    t.train()
    seen = {step: logs for step, logs in reporter.logs if "zz_gradwatch.health/4_grad_norm_log10" in logs}
    assert sorted(seen) == [4, 8]  # the Trainer's logging steps
    rec = next(r for r in cb.monitor.records if r.step == 8)
    assert seen[8]["zz_gradwatch.health/4_grad_norm_log10"] == pytest.approx(math.log10(rec.global_value("grad_norm")), abs=1e-12)
    assert seen[8]["zz_gradwatch.health/2_skip_share_min"] == rec.health["skip_share_min"]  # the dashboard's health section
    # the early layers' ratio the docs promise: on this 3-layer GPT-2 it was NaN (left out of the logs) while
    # its attention branches started near-dormant (tests/alerts: dormant blocks)
    for step in (4, 8):
        assert math.isfinite(seen[step]["zz_gradwatch.health/3_grad_to_weight_early_log10"])
