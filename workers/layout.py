"""The sweep's sequence layout (docs/DESIGN.md §1), without torch: the driver plans and validates
with it before any model is loaded.

``BOS, r×10, A, B, r×10, A`` — 24 tokens; ids below FIRST_TOKEN are never drawn.
"""

FIRST_TOKEN = 4  # ids 0..3 are special in the attn-only models' tokenizer
N_FILLER = 10
SEQ_LEN = 1 + N_FILLER + 2 + N_FILLER + 1  # 24
A_POS, B_POS = 1 + N_FILLER, 2 + N_FILLER  # 11, 12
N_INNER = SEQ_LEN - 2  # the 22 tokens between BOS and the final A
FILLER_POS = tuple(range(1, A_POS)) + tuple(range(B_POS + 1, SEQ_LEN - 1))
