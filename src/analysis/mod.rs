//! Pure functions over captured summaries (no model needed).

pub mod attractors;
pub mod claims;
pub mod compare;
pub mod corpus;
pub mod correlation;
pub mod distance;
pub mod flow;
pub mod massive;
pub mod similarity;
pub mod stats;
pub mod tokens;
