"""The lm-evaluation-harness model `jaxlm`: any harness task on a jaxlm model.

    pip install 'jaxlm[eval]'
    python -m jaxlm.evaluate.lm_eval --model jaxlm --model_args workdir=runs/tiny \\
        --tasks hellaswag --batch_size 16
    python -m jaxlm.evaluate.lm_eval --model jaxlm --model_args hf_dir=~/models/llama \\
        --tasks my_task --include_path ./my_tasks      # offline: a local YAML task + JSONL

`python -m jaxlm.evaluate.lm_eval` is the harness's own command line with the model registered
(the harness finds models only in its own package); from Python, importing this module
registers it: `lm_eval.simple_evaluate(model="jaxlm", model_args={"workdir": W}, ...)`.
model_args: `workdir` (a run or an import; `step` picks a checkpoint) or `hf_dir`;
`max_length` (default: the run's train.seq_len, else the model's max_seq_len); `max_gen_toks`.

Requests run through jaxlm's sharded forward pass over every device:
- loglikelihood: requests sharing a context run it once (`choices.score_continuations`); the
  context is cut from the left so context + continuation fit `max_length`, as the harness's
  Hugging Face backend does.
- loglikelihood_rolling: the windows of `jaxlm.evaluate.text` (BOS, then disjoint windows of
  `max_length`, the harness's own rolling layout).
- generate_until: KV-cache decoding (`jaxlm.generate`), greedy unless the task asks to sample,
  cut at the first stop sequence.
Token ids come from the model's tokenizer with BOS in front, as jaxlm trains and as Llama
tokenizers encode for the harness's `hf` backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401 - the harness's own models stay registered beside ours
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from jaxlm.errors import JaxlmError
from jaxlm.evaluate import choices, scoring, text, trained


@register_model("jaxlm")
class JaxlmLM(TemplateLM):
    """A jaxlm run, import or Hugging Face model directory as an lm-eval model."""

    def __init__(
        self,
        workdir: str | None = None,
        hf_dir: str | None = None,
        step: int | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        **_harness_args: Any,  # device, max_batch_size, ...: jaxlm places itself
    ):
        super().__init__()
        if bool(workdir) == bool(hf_dir):
            raise JaxlmError("model_args need exactly one of workdir=... or hf_dir=....")
        if hf_dir:
            self.model = trained.load_hf(hf_dir)
        else:
            self.model = trained.load_trained(workdir, step=None if step is None else int(step))
        run_len = self.model.config.train.seq_len if self.model.config is not None else 0
        self._max_length = int(max_length or run_len or self.model.setup.model_cfg.max_seq_len)
        # "auto" asks the harness's HF backend to probe memory; a fixed size serves here.
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.tok = self.model.tokenizer

    # ------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id >= 0 else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list:
        ids = self.tok.encode(string)
        if add_special_tokens is False or self.tok.bos_id < 0:
            return ids
        return [self.tok.bos_id, *ids]

    def tok_decode(self, ids: Sequence[int], **_: Any) -> str:
        return self.tok.decode(ids)

    # ------------------------------------------------------------------ requests

    def _loglikelihood_tokens(
        self, requests: list, disable_tqdm: bool = False, **_: Any
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy) per (key, context ids, continuation ids)."""
        groups: dict[tuple, list[int]] = {}  # context ids -> indices of its requests
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation or len(continuation) > self.max_length:
                raise JaxlmError(
                    f"a continuation of {len(continuation)} tokens cannot be scored with "
                    f"max_length={self.max_length}."
                )
            # As the hf backend: keep the last max_length + 1 tokens of context + continuation.
            whole = [*context, *continuation][-(self.max_length + 1) :]
            groups.setdefault(tuple(whole[: -len(continuation)]), []).append(i)
        batches = [(list(ctx), [requests[i][2] for i in idx]) for ctx, idx in groups.items()]
        setup = self.model.setup
        scores = choices.score_continuations(
            setup.graphdef,
            self.model.params,
            batches,
            seq_len=self.max_length,
            batch_size=self.batch_size,
            mesh_rules=setup.mesh_rules,
        )
        order = [i for idx in groups.values() for i in idx]
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for k, i in enumerate(order):
            results[i] = (float(scores.logprob[k]), bool(scores.greedy[k]))
            if requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Summed log-probability of each whole text (BOS first), over disjoint windows."""
        seqs, owners = [], []
        for r, req in enumerate(requests):
            (string,) = req.args
            windows = text.document_windows(
                self.tok.encode(string), self.tok.bos_id, self.max_length, self.max_length
            )
            seqs += windows
            owners += [r] * len(windows)
        setup = self.model.setup
        scores = scoring.score_sequences(
            setup.graphdef,
            self.model.params,
            seqs,
            seq_len=self.max_length,
            batch_size=self.batch_size,
            mesh_rules=setup.mesh_rules,
        )
        totals = [0.0] * len(requests)
        for r, logprob in zip(owners, scores.logprob, strict=True):
            totals[r] += float(logprob)
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Continuations decoded with the KV cache until a stop sequence or max_gen_toks."""
        from jaxlm import generate

        eos = self.tok.decode([self.tok.eos_id]) or None
        setup = self.model.setup
        out: list[str] = [""] * len(requests)
        for start in range(0, len(requests), self.batch_size):
            chunk = list(range(start, min(start + self.batch_size, len(requests))))
            by_kwargs: dict[str, list[int]] = {}
            for i in chunk:
                by_kwargs.setdefault(repr(sorted(requests[i].args[1].items())), []).append(i)
            for indices in by_kwargs.values():
                kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
                until = handle_stop_sequences(kwargs.get("until"), eos=eos)
                n_new = kwargs["max_gen_toks"]
                keep = max(self.max_length - n_new, 1)
                prompts = [self.tok_encode(requests[i].args[0])[-keep:] for i in indices]
                new = generate.generate(
                    setup.graphdef,
                    self.model.params,
                    prompts,
                    max_new_tokens=n_new,
                    eos_id=self.tok.eos_id,
                    temperature=float(kwargs.get("temperature") or 0.0),
                    top_p=float(kwargs.get("top_p") or 1.0),
                    top_k=int(kwargs.get("top_k") or 0),
                    mesh_rules=setup.mesh_rules,
                )
                for i, ids in zip(indices, new, strict=True):
                    completion = self.tok.decode(ids)
                    for stop in until:
                        if stop and stop in completion:
                            completion = completion[: completion.index(stop)]
                    out[i] = completion
                    self.cache_hook.add_partial("generate_until", requests[i].args, completion)
        return out


def main() -> None:
    """lm-eval's command line, with the `jaxlm` model registered beside the harness's own."""
    from lm_eval.__main__ import cli_evaluate

    from jaxlm import cli

    # The harness parses its own flags (argparse); a bad workdir, hf_dir or request is still one
    # `error:` line, as in jaxlm's commands.
    with cli.ctrl_c_is_one_line(), cli.errors_are_one_line():
        cli_evaluate()


if __name__ == "__main__":
    main()
