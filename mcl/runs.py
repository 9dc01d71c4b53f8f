"""The paper's side of common.loop.fit for the four scripts: a network trained alone (BaselineRun) and L-MCL
(LMCLRun; on ImageNet with the memory-bank contrast, MemoryBankRun). Each holds its networks, optimizers, the
authors' epoch-wise lr rule, the step, the evaluation and the best-epoch bookkeeping."""
import torch
import torch.nn.functional as F

from common.checkpoint import load_state_dict_checked, save_checkpoint
from common.distributed import wrap_ddp
from common.fast import at_least_fp32
from common.loop import Run
from common.meters import topk_accuracy
from mcl.lmcl import LOSS_LOG, MetaStep, make_optimizers, training_loss
from mcl.memory_bank import MemoryBankContrast, MemoryBankMetaStep
from mcl.models import networks_of
from mcl.train_utils import head_names, lr_at_epoch, seed_epoch, set_lr, sync_buffers, test_heads


class BaselineRun(Run):
    """One network, cross-entropy, SGD (Nesterov on CIFAR, plain momentum on ImageNet, as released).
    RESEED_EPOCHS: the ImageNet scripts' per-(seed, process, epoch) data seeds (train_utils.seed_epoch)."""

    def __init__(self, setup, args, model, test_loader, nesterov=True, reseed_epochs=False):
        self.setup, self.args, self.test_loader, self.reseed_epochs = setup, args, test_loader, reseed_epochs
        self.model = model
        # what is called: channels_last / compiled, DDP under torchrun; `model` keeps the state dict
        self.forward_model = wrap_ddp(setup.fast.prepare(model), setup.ctx)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=args.init_lr, momentum=0.9, nesterov=nesterov,
                                         weight_decay=args.weight_decay)
        self.lr = args.init_lr
        self.best = {"acc": -1.0, "epoch": 0}

    def on_epoch_start(self, epoch):
        self.lr = lr_at_epoch(self.args, epoch)
        set_lr([self.optimizer], self.lr)
        if self.reseed_epochs:
            seed_epoch(self.args.manual_seed, self.setup.ctx.rank, epoch)

    def train_step(self, step, x, y):
        self.forward_model.train()
        with self.setup.fast.autocast():
            _, logits = self.forward_model(x)
        loss = F.cross_entropy(at_least_fp32(logits), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach(), **topk_accuracy(logits.detach(), y, (1,), "net/")}

    def train_record(self, meter):
        return {"lr": self.lr, **meter.per_sample("train/")}

    def evaluate(self, epoch):
        return test_heads(self.forward_model, self.test_loader, self.setup, single=True)

    def on_epoch_end(self, epoch, record):
        if record["test/net/top1"] > self.best["acc"]:
            self.best.update(acc=record["test/net/top1"], epoch=epoch + 1)
            if self.setup.ctx.is_main:
                save_checkpoint(self.setup.run_dir + "/best.pt", {"net": self.model.state_dict(), "epoch": epoch + 1,
                                                                  "acc": self.best["acc"]},
                                meta={"arch": self.args.arch})
        self.setup.logger.print(f"epoch {epoch + 1}/{self.args.epochs} lr {self.lr:.5f} train loss "
                                f"{record['train/loss']:.4f} test top-1 {record['test/net/top1']:.2f} (best "
                                f"{self.best['acc']:.2f}, epoch {self.best['epoch']})")

    def summary(self, record):
        return {"best_top1": self.best["acc"], "best_epoch": self.best["epoch"], **super().summary(record)}

    def state_dict(self):
        return {"net": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "best": dict(self.best)}

    def load_state_dict(self, state):
        load_state_dict_checked(self.model, state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.best = dict(state["best"])


class LMCLRun(Run):
    """L-MCL on CIFAR-100: every iteration one SGD step on L = L_cls + L_kd + L_MCL, and on every --meta-freq-th
    batch of the epoch (batch index 0, 50, ...), on the same batch, the meta step into the loss-weight network.
    MODULES: (pair, embed heads, aggregator, loss-weight network); SAMPLER: the class-balanced sampler (its class
    order is state that carries over from one epoch to the next)."""

    def __init__(self, setup, args, modules, test_loader=None, sampler=None):
        self.setup, self.args, self.test_loader, self.sampler = setup, args, test_loader, sampler
        self.pair, self.embed_heads, self.aggregator, self.weight_net = modules
        ctx = setup.ctx
        # what the ordinary step and the test call (channels_last / compiled, DDP under torchrun); the plain modules
        # keep the state dicts and serve the meta step (never compiled)
        self.forward_pair = wrap_ddp(setup.fast.prepare(self.pair), ctx)
        self.forward_embed, self.forward_aggregator = wrap_ddp(self.embed_heads, ctx), wrap_ddp(self.aggregator, ctx)
        self.optimizer, self.weight_optimizer = make_optimizers(self.pair, self.embed_heads, self.aggregator,
                                                                self.weight_net, args)
        self.meta = self.make_meta_step()
        self.lr = args.init_lr
        self.best = {"acc": -1.0, "per_net": [-1.0] * len(networks_of(self.pair)), "epoch": 0}
        # the logged weight of every LOSS_LOG term (the authors log weighted terms), a Python float as theirs
        self.log_weights = [(name, key, getattr(args, w) if isinstance(w, str) else w) for name, key, w in LOSS_LOG]

    def make_meta_step(self):
        return MetaStep(self.pair, self.embed_heads, self.weight_net, self.args, exact=self.args.fixed_meta_grad,
                        recompute=self.args.meta_recompute)

    def modules(self):
        return {"net": self.pair, "criterion_mcl": self.embed_heads, "aggregator": self.aggregator,
                "loss_weight_network": self.weight_net}

    def on_epoch_start(self, epoch):
        self.lr = lr_at_epoch(self.args, epoch)
        set_lr([self.optimizer, self.weight_optimizer], self.lr)

    def ordinary_step(self, x, y, contrast=None):
        """One SGD step on L (weights of the loss-weight network held constant); returns training_loss's dict."""
        for module in (self.forward_pair, self.forward_embed, self.forward_aggregator):
            module.train()
        self.optimizer.zero_grad()
        out = training_loss(self.forward_pair, self.forward_embed, self.forward_aggregator, self.weight_net, x, y,
                            self.args, contrast=contrast, autocast=self.setup.fast.autocast)
        out["total"].backward()
        self.optimizer.step()
        return out

    def logged(self, out, y):
        """The step's log values: weighted loss terms in float64 (weight x term, the authors' products) and the
        top-1 of every head and aggregate."""
        values = {name: out[key].detach().double() * w for name, key, w in self.log_weights}
        names = head_names(len(out["logits"]), len(out["logits"][0]))
        for row, net in zip(names, out["logits"]):
            for name, z in zip(row, net):
                values.update(topk_accuracy(z.detach(), y, (1,), f"{name}/"))
        for i, z in enumerate(out["aggregated_logits"]):
            values.update(topk_accuracy(z.detach(), y, (1,), f"net{i + 1}/aggregated/"))
        return values

    def train_step(self, step, x, y):
        out = self.ordinary_step(x, y)
        values = self.logged(out, y)
        if step % self.args.meta_freq == 0:
            self.meta.step(x, y, self.lr, self.weight_optimizer)
        return values

    def train_record(self, meter):
        return {"lr": self.lr, **meter.per_sample("train/")}

    def evaluate(self, epoch):
        return test_heads(self.forward_pair, self.test_loader, self.setup)

    def on_epoch_end(self, epoch, record):
        if record["test/max_heads/top1"] > self.best["acc"]:  # the authors select on the max over every head
            self.best.update(acc=record["test/max_heads/top1"], epoch=epoch + 1)
            if self.setup.ctx.is_main:
                save_checkpoint(self.setup.run_dir + "/best.pt", {"net": self.pair.state_dict(), "epoch": epoch + 1,
                                                                  "acc": self.best["acc"]},
                                meta={"arch": self.args.arch})
        self.best["per_net"] = [max(b, record[f"test/net{i + 1}/max_heads/top1"])
                                for i, b in enumerate(self.best["per_net"])]
        heads = [k[len("test/"):-len("/top1")] for k in record if k.startswith("test/net") and k.endswith("/top1")
                 and "max_heads" not in k]
        self.setup.logger.print(
            f"epoch {epoch + 1}/{self.args.epochs} lr {self.lr:.5f} train loss {record['train/loss']:.4f} | test "
            f"top-1 " + " ".join(f"{n} {record[f'test/{n}/top1']:.2f}" for n in heads)
            + f" | best max-over-heads {self.best['acc']:.2f} (epoch {self.best['epoch']})")

    def summary(self, record):
        return {"best_max_heads_top1": self.best["acc"], "best_epoch": self.best["epoch"],
                "best_max_heads_top1_per_net": self.best["per_net"], **super().summary(record)}

    def state_dict(self):
        state = {key: module.state_dict() for key, module in self.modules().items()}
        state.update(optimizer=self.optimizer.state_dict(), weight_optimizer=self.weight_optimizer.state_dict(),
                     best=dict(self.best))
        if self.sampler is not None:
            state["sampler"] = self.sampler.state_dict()
        return state

    def load_state_dict(self, state):
        for key, module in self.modules().items():
            load_state_dict_checked(module, state[key], key)
        self.optimizer.load_state_dict(state["optimizer"])
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        self.best = dict(state["best"])
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])


class MemoryBankRun(LMCLRun):
    """L-MCL on ImageNet: the contrast reads per-network memory banks through each sample's index row, the memory
    takes the final heads' embeddings of every process after the step, the data seeds are per (seed, process,
    epoch), and rank 0's BatchNorm statistics are made everyone's before a test or a checkpoint.

    The loader's targets carry the index rows (memory_bank.ContrastiveIndices): column 0 is the label."""

    def __init__(self, setup, args, modules, memory, test_loader=None):
        self.memory = memory
        super().__init__(setup, args, modules, test_loader)

    def make_meta_step(self):
        return MemoryBankMetaStep(self.pair, self.embed_heads, self.weight_net, self.memory, self.args,
                                  self.setup.ctx, exact=self.args.fixed_meta_grad, recompute=self.args.meta_recompute)

    def modules(self):
        return {**super().modules(), "memory": self.memory}

    def on_epoch_start(self, epoch):
        super().on_epoch_start(epoch)
        seed_epoch(self.args.manual_seed, self.setup.ctx.rank, epoch)

    def train_step(self, step, x, target):
        y, contrast_idx = target[:, 0], target[:, 1:]
        contrast = MemoryBankContrast(self.memory, contrast_idx, self.args)
        out = self.ordinary_step(x, y, contrast)
        contrast.update_memory_(out["embeddings"], self.setup.ctx)  # final heads of every process, after the loss
        values = self.logged(out, y)
        if step % self.args.meta_freq == 0:
            self.meta.step(x, y, self.lr, self.weight_optimizer, contrast_idx=contrast_idx)
        return values

    def evaluate(self, epoch):
        sync_buffers(self.pair, self.setup.ctx)
        return super().evaluate(epoch)

    def state_dict(self):
        sync_buffers(self.pair, self.setup.ctx)  # rank 0's BN statistics are the ones saved and used from here on
        return super().state_dict()
