//! Answer extraction and mathematical equivalence (see issue 3).
