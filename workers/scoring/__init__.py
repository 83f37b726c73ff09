"""Scoring: the log-odds maths (``logodds``), the one home of what runs (``variant``), the scorers
behind one interface (``scorer``), compilation helpers (``compiled``, ``compile_cache``) and the
load-time proof against TransformerLens (``check``). Imports run logodds, variant → compiled →
scorer → check."""
