"""Models: where they come from and what their config means (``source``, ``fields``), the compact
forward's weights read straight from a checkpoint with exact folds (``folds``), and every
TransformerLens call of the project (``hooked``). Imports run source → folds → hooked."""
