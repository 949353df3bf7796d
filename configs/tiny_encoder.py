"""Tiny BERT-style encoder on the Python standard library: masked-LM pretraining on a CPU.

    python -m jaxlm.main --config=configs/tiny_encoder.py

Hardware: any CPU. Data: the standard library's source, as in configs/tiny.py, with a tokenizer
that has a [MASK] piece (so it is prepared once into its own cache). Model: the tiny recipe's
3 layers, d=384, with bidirectional attention within each packed document. Objective: 15% of
tokens chosen, 80% of them replaced by [MASK], 10% by a random piece, 10% kept; the loss is on
the chosen tokens only. The end of the run prints the held-out masked-token accuracy beside a
unigram-frequency baseline (always predicting the most frequent training token).

Measured: see docs/perf.md ("Masked LM: tiny encoder").
"""

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.name = "tiny_encoder"
    c.objective = "masked"
    c.objectives.mask_rate = 0.15
    c.objectives.whole_word = False
    c.eval.next_line_examples = 0  # a next-line task scores left-to-right text: not an encoder's
    c.sample.max_tokens = 0  # nor is sampling; tools/generate.py --fill_mask shows predictions
    return c
