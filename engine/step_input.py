"""One step's model inputs as plain lists: what rank 0 builds from a scheduled batch and sends every other rank.

Rows are flattened: decode rows first (one token each), then prefill chunks. Each attention backend turns a
StepInput into its own metadata on its own device.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepInput:
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # cache slot (block * block_size + offset) of each token
    decode_tables: list[list[int]] = field(default_factory=list)  # block table of each decode row
    decode_lens: list[int] = field(default_factory=list)  # tokens each decode row attends over
    prefills: list[tuple[int, int, int, list[int]]] = field(default_factory=list)  # (row, start, end, table)
    sample_rows: list[int] = field(default_factory=list)
    # encoder-decoder models only: the request id of each sequence (decodes, then prefills), the encoder inputs to
    # run this step (sequences starting at position 0), and requests finished since the last step
    seq_ids: list[str] = field(default_factory=list)
    encoder_inputs: list[tuple[str, list[int]]] = field(default_factory=list)
    released: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def is_decode_only(self) -> bool:
        return not self.prefills and bool(self.decode_tables)

    def sequences(self) -> list[tuple[int, int, int, list[int]]]:
        """Every sequence of the step as (first row, query tokens, tokens after the step, block table)."""
        seqs = [(i, 1, n, t) for i, (n, t) in enumerate(zip(self.decode_lens, self.decode_tables))]
        return seqs + [(row, end - start, end, table) for row, start, end, table in self.prefills]
