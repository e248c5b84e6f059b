"""lm-evaluation-harness for CQIL: the `cqil` model type, and the runner behind `cqil-eval --tasks`.

    import cqil.quality.lm_eval                      # registers the model type "cqil"
    lm_eval.simple_evaluate(model="cqil", model_args="pretrained=MODEL,p=2,adapter=ADAPTER", tasks=["sciq"])

`pretrained` is a checkpoint folder (run under a plan given by p / start / end / bypass /
bypass_semantics, with an optional merged adapter) or a compiled engine directory; both are a
`cqil.quality.targets.Target`, so the harness scores exactly what cqil-eval measures.

The requests, as transformers' `HFLM` serves them (so scores compare with published ones):

- loglikelihood: context and continuation tokenized as HFLM does (the tokenizer's own special
  tokens; the ids of context + continuation split after the context's), except that a
  continuation the tokenizer merges into the context's last token is encoded on its own (HFLM
  stops on it); the pair is cut from the left to `max_length + 1` tokens; the continuation's log
  probability and whether greedy decoding would produce it. Rows of a batch are right-padded,
  which a causal model never sees.
- loglikelihood_rolling: the text's tokens without special tokens, after one BOS (EOS when the
  tokenizer has no BOS), in lm_eval's disjoint rolling windows of `max_length`; for text shorter
  than that, exactly the log likelihood behind cqil-eval's perplexity of the same text.
- generate_until: greedy only (`until` strings and EOS stop it; `max_gen_toks`, default 256).

Not covered: sampling, chat templates, several processes (lm_eval's data parallelism).
"""

from __future__ import annotations

from pathlib import Path

import lm_eval
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from cqil.errors import CqilError, first_line
from cqil.model.config import ModelConfig
from cqil.model.tokenizer import load_tokenizer
from cqil.plan import Plan
from cqil.quality.targets import engine_target, model_target, plan_for_eval

DEFAULT_MAX_GEN_TOKS = 256


@register_model("cqil")
class CqilLM(TemplateLM):
    """A checkpoint under a CQIL plan (optionally with an adapter), or a compiled engine, for lm_eval."""

    def __init__(self, pretrained: str, p: int | None = None, start: int | None = None, end: int | None = None,
                 bypass: int | None = None, bypass_semantics: str | None = None, plan: Plan | None = None,
                 adapter: str | None = None, allow_plan_mismatch: bool = False, device: str | None = "cpu",
                 precision: str = "fp32", batch_size: int | str = 1, max_length: int | None = None,
                 max_batch_size: int | None = None, backend: str = "onnxruntime", devices: str | None = None):
        from cqil.exporters.manifest import is_engine_dir

        super().__init__()
        if is_engine_dir(pretrained):
            given = [k for k, v in dict(p=p, start=start, end=end, bypass=bypass, plan=plan, adapter=adapter).items()
                     if v is not None]
            if given:
                raise CqilError(f"lm_eval: {pretrained} is an engine directory; its plan and weights are fixed, "
                                f"so {', '.join(given)} cannot apply")
            self.target = engine_target(pretrained, backend=backend, **({"devices": devices} if devices else {}))
        else:
            if plan is None:
                plan, _ = plan_for_eval(ModelConfig.from_dir(pretrained), p, start, end, bypass,
                                        bypass_semantics or "once")
            self.target = model_target(pretrained, plan, adapter, bool(allow_plan_mismatch), max_seq_len=max_length,
                                       device=device or "cpu", precision=precision)
        self.tokenizer = load_tokenizer(self.target.tokenizer_dir)
        if self.tokenizer.eos_token_id is None:
            raise CqilError(f"lm_eval: the tokenizer in {self.target.tokenizer_dir} has no EOS token")
        limit = self.target.max_seq_len
        self.max_length = min(int(max_length), limit) if max_length else limit
        if str(batch_size).startswith("auto"):
            batch_size = 1  # no search for the largest batch: one sequence at a time
        self.batch_size = int(batch_size)
        if self.batch_size < 1 or self.max_length < 2:
            raise CqilError(f"lm_eval: batch_size must be >= 1 and max_length >= 2 "
                            f"(got {batch_size}, {self.max_length})")

    # -- tokens -------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.target.tokenizer_dir)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None and self.tokenizer.bos_token and string.startswith(self.tokenizer.bos_token):
            add_special_tokens = False  # the text already starts with BOS: not a second one (as HFLM)
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **options)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        context_enc, continuation_enc = super()._encode_pair(context, continuation)
        if continuation.strip() and not continuation_enc:  # merged into the context's last token
            context_enc = self.tok_encode(context)
            continuation_enc = self.tok_encode(continuation, add_special_tokens=False)
        return context_enc, continuation_enc

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # -- scoring ------------------------------------------------------------------------------------

    def _logprobs(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Per row, log-softmax of its logits [len(row), V]: one right-padded batch through the target."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.prefix_token_id, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        logits = self.target.logits(ids)
        logits = logits if torch.is_tensor(logits) else torch.from_numpy(logits)
        return [F.log_softmax(logits[b, :len(row)].float().cpu(), dim=-1) for b, row in enumerate(rows)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """(sum of log p(continuation | context), greedy?) per (key, context ids, continuation ids)."""
        from tqdm import tqdm

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        size = override_bs or self.batch_size
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm)
        for first in range(0, len(order), size):
            chosen = order[first:first + size]
            rows, scored = [], []
            for i in chosen:
                _, context, continuation = requests[i]
                inputs = (context + continuation)[-(self.max_length + 1):][:-1]
                n = min(len(continuation), len(inputs))
                rows.append(inputs)
                scored.append(continuation[len(continuation) - n:])
            for i, row, target, logprobs in zip(chosen, rows, scored, self._logprobs(rows)):
                picked = logprobs[len(row) - len(target):]  # [n, V]: the positions predicting `target`
                wanted = torch.tensor(target, dtype=torch.long)
                score = float(picked.gather(-1, wanted[:, None]).sum())
                greedy = bool((picked.argmax(-1) == wanted).all())
                results[i] = (score, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            bar.update(len(chosen))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for (text,) in [r.args for r in requests]:
            tokens = self.tok_encode(text, add_special_tokens=False)
            windows = [make_disjoint_window(w) for w in
                       get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            total = sum(score for score, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences

        out = []
        for context, gen_kwargs in [r.args for r in requests]:
            kwargs = dict(gen_kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0:
                raise CqilError("lm_eval: the cqil model type generates greedily only (do_sample / temperature > 0)")
            until = handle_stop_sequences(kwargs.get("until"), eos=self.tok_decode([self.eot_token_id]) or None)
            max_new = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            prompt = self.tok_encode(context)[-max(self.max_length - max_new, 1):]
            max_new = min(max_new, self.max_length - len(prompt))
            new: list[int] = []
            for token in (self.target.greedy(prompt, max_new) if max_new > 0 else ()):
                if token == self.eot_token_id:
                    break
                new.append(token)
                if any(stop in self.tok_decode(new) for stop in until):
                    break
            text = self.tok_decode(new)
            for stop in until:
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def task_manager(tasks: list[str], include_path: str | None):
    """A TaskManager that knows `tasks`; without lm_eval's own ~10 s index when include_path has them all."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise CqilError(f"--include-path {include_path} is not a directory")
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in manager.all_tasks for t in tasks):
            return manager
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise CqilError(f"lm_eval: unknown task(s) {', '.join(unknown)} (lm_eval {lm_eval.__version__}"
                        + (f", and {include_path}" if include_path else "") + ")")
    return manager


def evaluate_tasks(lm: CqilLM, tasks: list[str], include_path: str | None = None, num_fewshot: int | None = None,
                   limit: float | None = None) -> dict:
    """lm_eval.simple_evaluate of `lm` on `tasks`: its result dict ("results" per task, "configs", ...)."""
    manager = task_manager(tasks, include_path)
    if limit is not None and limit >= 1:
        limit = int(limit)
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                       task_manager=manager, log_samples=False, batch_size=lm.batch_size)
    except (ConnectionError, FileNotFoundError) as e:  # a task's dataset is not here and the hub is out of reach
        raise CqilError(f"lm_eval: cannot load the data of {', '.join(tasks)}: {first_line(e)}") from None
