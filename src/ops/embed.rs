//! Token embedding lookup.

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Rows `ids` of `table: [vocab, d]` as `[ids.len(), d]`; an id outside the vocabulary is an error.
pub fn embed(table: &Tensor, ids: &[u32]) -> Result<Vec<f32>> {
    let (vocab, d) = (table.rows(), table.cols());
    let mut out = Vec::with_capacity(ids.len() * d);
    for &id in ids {
        let id = id as usize;
        if id >= vocab {
            return Err(Error::arg(
                "token id",
                format!("{id} is outside the vocabulary of {vocab}"),
            ));
        }
        out.extend(table.rows_f32(id, id + 1));
    }
    Ok(out)
}
