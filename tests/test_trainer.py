"""The IMLoR2C schedule inside transformers.Trainer (issue 5, item 3): merges and injections done
by the callback during Trainer.train() hand the new parameters to the Trainer's optimizer (which
then changes them), take the removed ones out of it (which it then no longer touches), and
injected LoRAs are never frozen again, across epochs. Tiny BERT, in-memory data, CPU only."""

import os
import types

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it

import lor2c_ops as lo  # noqa: E402
from lor2c_ops.adapters import IMLoR2CSchedule, trainer_callback  # noqa: E402
from lor2c_ops.adapters.schedule import _unwrap_optimizer  # noqa: E402

VOCAB, SEQ, N_EXAMPLES, BATCH = 64, 8, 16, 4  # 4 optimizer steps per epoch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is as fast, and on a shared 2-core machine two OpenMP threads
    competing with other processes make each step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bert(layers=4):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(cfg)


def dataset():
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(N_EXAMPLES):
        ids = torch.randint(1, VOCAB, (SEQ,), generator=g)
        label = int(ids[:3].sum() % 2)  # learnable from the tokens
        rows.append(
            {"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": label}
        )
    return rows


def optimizer_params(optimizer):
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


class Probe(transformers.TrainerCallback):
    """Runs after the schedule's callback. At every step end: the Trainer's optimizer holds
    exactly the model's trainable parameters; each edit's new parameters are trainable and
    change within two optimizer steps (a fresh LoRA's B moves at the first step; its A, whose
    gradient is zero while B is zero, at the second); the removed ones never change again and
    hold no optimizer state; injected LoRAs stay trainable."""

    def __init__(self, schedule):
        self.schedule, self.handle = schedule, schedule.handle
        self.seen = 0
        self.pending = []  # dicts: edit, step, added/removed snapshots, changed flags
        self.checked = []
        self.steps_of_edits = []

    def _check(self, state, model, optimizer):
        opt = _unwrap_optimizer(optimizer)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert optimizer_params(opt) == trainable, (
            "the optimizer must hold exactly the trainable parameters"
        )
        for lora in self.handle.injected.values():  # never re-frozen
            assert lora.lora_A.requires_grad and lora.lora_B.requires_grad
        for item in self.pending:
            if state.global_step <= item["step"]:
                continue
            after = state.global_step - item["step"]
            for p, before in item["added"]:
                if not torch.equal(p.detach(), before):
                    item["changed"].setdefault(id(p), after)
            for p, before in item["removed"]:
                assert torch.equal(p.detach(), before), "a removed parameter changed"
                assert p not in opt.state and p.grad is None
            if after >= 2:
                missing = [
                    i for i, (p, _) in enumerate(item["added"]) if id(p) not in item["changed"]
                ]
                assert not missing, (
                    f"{item['edit'].kind}: new parameters {missing} did not "
                    f"change in the two steps after the edit"
                )
                self.checked.append(item)
        self.pending = [i for i in self.pending if i not in self.checked]
        new = self.schedule.edits[self.seen :]
        self.seen = len(self.schedule.edits)
        for edit in new:
            # a later edit of the same event may replace what an earlier one added (with share,
            # both rebuild B_bank): that parameter is gone again, only its successor must train
            gone = {id(p) for p in edit.removed}
            for item in self.pending:
                item["added"] = [(p, b) for p, b in item["added"] if id(p) not in gone]
            self.pending.append(
                {
                    "edit": edit,
                    "step": state.global_step,
                    "changed": {},
                    "added": [(p, p.detach().clone()) for p in edit.added],
                    "removed": [(p, p.detach().clone()) for p in edit.removed],
                }
            )
            self.steps_of_edits.append(state.global_step)
        live = {id(p) for p in model.parameters()}
        in_opt = optimizer_params(opt)
        for item in self.pending[len(self.pending) - len(new) :]:
            assert all(
                id(p) in live and p.requires_grad and id(p) in in_opt for p, _ in item["added"]
            )
            assert not any(id(p) in live or id(p) in in_opt for p, _ in item["removed"])

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._check(state, model, optimizer)

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._check(state, model, optimizer)


def train(tmp_path, schedule_kw, share=False, epochs=3, layers=4):
    model = tiny_bert(layers)
    handle = lo.apply_lor2c(
        model, lo.LoR2CConfig(r=4, alpha=8, share=share, trainable=("classifier",))
    )
    schedule = IMLoR2CSchedule(handle, **schedule_kw)
    probe = Probe(schedule)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        num_train_epochs=epochs,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=dataset(),
        callbacks=[trainer_callback(schedule), probe],
    )
    frozen_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
    }
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    # the base model never moved
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p.detach(), frozen_before[n]), n
    # every edit was checked after two more optimizer steps
    assert probe.pending == [] and len(probe.checked) == len(schedule.edits)
    return model, handle, schedule, probe, trainer


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize(
    "kind, kw",
    [
        ("MergeLoR2C", dict(max_merges=2)),
        ("InjectLoR2C", dict(max_injections=2)),
        ("IMLoR2C", dict(max_merges=1, max_injections=1)),
    ],
)
def test_edits_in_trainer_reach_the_optimizer_by_step(tmp_path, kind, kw, share):
    model, handle, schedule, probe, trainer = train(tmp_path, dict(kw, interval=1), share=share)
    # total taken from the Trainer (12 steps): events in the first quarter (steps 1 to 3)
    assert schedule.total == trainer.state.max_steps == 12
    assert set(probe.steps_of_edits) <= {1, 2, 3} and probe.steps_of_edits
    assert schedule.merges == kw.get("max_merges", 0)
    assert schedule.injections == kw.get("max_injections", 0)
    kinds = [e.kind for e in schedule.edits]
    assert kinds.count("merge") == schedule.merges and kinds.count("inject") == schedule.injections
    assert len(handle.injected) == 2 * schedule.injections  # query and value per injection
    assert sum(a.end - a.start + 1 for a in handle.adapters) + schedule.injections == 4


@pytest.mark.parametrize("share", [False, True])
def test_injected_lora_is_never_refrozen_across_epochs(tmp_path, share):
    """The published code froze injected LoRAs again at the next epoch: here an injection at the
    end of epoch 1 keeps training through epochs 2 to 4."""
    kw = dict(max_merges=1, max_injections=1, interval=1, unit="epoch")
    model, handle, schedule, probe, trainer = train(tmp_path, kw, share=share, epochs=4)
    assert schedule.total == 4 and probe.steps_of_edits == [4, 4]  # end of epoch 1 only
    assert [e.kind for e in schedule.edits] == ["merge", "inject"]
    inject = schedule.edits[1]
    snapshot = {id(p): b for p, b in probe.checked[1]["added"]}
    assert len(snapshot) == len(inject.added)
    opt = _unwrap_optimizer(trainer.optimizer)
    for p in inject.added:
        assert p.requires_grad and id(p) in optimizer_params(opt)
        assert p in opt.state  # Adam state: it was stepped
        assert not torch.equal(p.detach(), snapshot[id(p)])
    assert len(handle.injected) == 2


def test_callback_refuses_edits_with_several_processes():
    model = tiny_bert(2)
    handle = lo.apply_lor2c(model, lo.LoR2CConfig(r=2))
    cb = trainer_callback(IMLoR2CSchedule(handle, max_merges=1))
    args = types.SimpleNamespace(world_size=2)
    state = types.SimpleNamespace(max_steps=10, num_train_epochs=1)
    with pytest.raises(RuntimeError, match="2 processes"):
        cb.on_train_begin(args, state, None)
    # no edits planned: nothing to refuse
    trainer_callback(IMLoR2CSchedule(handle)).on_train_begin(args, state, None)


@pytest.mark.parametrize("share", [False, True])
def test_plain_loop_inject_hands_every_new_parameter_to_the_optimizer(share):
    """With share=True, inject() rebuilds B_bank without the injected adapter's row: the new
    B_bank must join the optimizer (it used to be dropped, so the remaining shared adapters
    stopped training after an injection)."""
    model = tiny_bert(3)
    handle = lo.apply_lor2c(model, lo.LoR2CConfig(r=4, share=share))
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2)
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1])

    def step():
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()

    step()
    edit = handle.inject(1, optimizer=opt)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == optimizer_params(opt)
    before = {id(p): p.detach().clone() for p in handle.parameters()}
    step()
    step()
    for a in handle.adapters:  # the remaining LoR2C adapters keep training
        assert not torch.equal(
            a.lora_B.detach(),
            before[id(a.lora_B)] if not share else before[id(handle.container.bank.B_bank)][a.row],
        )
    assert all(not torch.equal(p.detach(), before[id(p)]) for p in edit.added)
