//! One error type for every kernel. The glue turns it into a `PolarsError`
//! (a `ComputeError` in Python) or a `ValueError` for the fit accumulators.

/// Which input of a sparse row a problem was found in; the glue replaces it by
/// the real column name, which the kernels never see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    GeneIdx,
    Values,
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A bad entry in one cell's sparse row: `row` counts from 0 within the
    /// rows handed to this call.
    #[error("{problem} at row {row}. {fix}")]
    Row { part: Part, row: usize, problem: String, fix: &'static str },
    #[error("{what}: expected {expected}, got {got}")]
    Shape { what: &'static str, expected: usize, got: usize },
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
