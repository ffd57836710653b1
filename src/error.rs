//! One error type for every kernel. The glue turns it into a `PolarsError`
//! (a `ComputeError` in Python) or a `ValueError` for the fit accumulators.

/// Which input of a sparse row a problem was found in; the glue replaces it by
/// the real column name, which the kernels never see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The row's gene indices (`gene_idx`).
    GeneIdx,
    /// The row's values (counts or expression).
    Values,
}

/// Every error a kernel returns: a bad input row, a length mismatch, or any
/// other invalid argument; the message says what is wrong and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A bad entry in one cell's sparse row: `row` counts from 0 within the
    /// rows handed to this call.
    #[error("{problem} at row {row}. {fix}")]
    Row {
        /// Which input of the row is bad (named by the glue).
        part: Part,
        /// The row's position, from 0, within the rows handed to this call.
        row: usize,
        /// What is wrong with the row, with the offending values.
        problem: String,
        /// What the caller should do about it.
        fix: &'static str,
    },
    /// An input whose length (or width) does not match what the other inputs
    /// or the model imply.
    #[error("{what}: expected {expected}, got {got}")]
    Shape {
        /// The input (or dimension) that has the wrong size.
        what: &'static str,
        /// The size it should have.
        expected: usize,
        /// The size it has.
        got: usize,
    },
    /// Anything else (a bad argument or model, a device that cannot run); the
    /// string is the whole message.
    #[error("{0}")]
    Invalid(String),
}

impl KernelError {
    /// Prefix the message with the column the problem sits in.
    pub fn describe(&self, gene_idx: &str, values: &str) -> String {
        match self {
            KernelError::Row { part, .. } => {
                let col = match part {
                    Part::GeneIdx => gene_idx,
                    Part::Values => values,
                };
                format!("column '{col}': {self}")
            },
            _ => self.to_string(),
        }
    }
}

impl From<KernelError> for polars::prelude::PolarsError {
    fn from(e: KernelError) -> Self {
        polars::prelude::PolarsError::ComputeError(e.to_string().into())
    }
}
