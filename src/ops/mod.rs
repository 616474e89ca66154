//! CPU ops, one file per family. Activations are f32 row-major `[rows, cols]` slices; weights are
//! [`Tensor`](crate::Tensor)s in their stored dtype, converted to f32 per call.

pub mod act;
pub mod attention;
pub mod bf16;
pub mod embed;
#[cfg(test)]
pub(crate) mod gradcheck;
pub mod kd;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod quant;
pub mod rope;

/// `x += y` elementwise (residual connections).
pub fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Fails with [`Error::NonFinite`](crate::Error::NonFinite) at the first NaN or infinity of
/// `x: [rows, cols]`; `at(row)` names where that row is (the layer, the request, the position),
/// and the column is added. A pass over `x` is cheap next to the products that made it, so
/// forward passes call this after every block: a bad weight or input is reported where it first
/// shows instead of ending as a silent NaN answer.
pub fn check_finite(x: &[f32], cols: usize, at: impl FnOnce(usize) -> String) -> crate::Result<()> {
    match first_nonfinite(x) {
        None => Ok(()),
        Some((i, v)) => Err(nonfinite(i, v, cols, at)),
    }
}

/// The flat index and value of the first NaN or infinity of `x`, if any.
pub fn first_nonfinite(x: &[f32]) -> Option<(usize, f32)> {
    x.iter().position(|v| !v.is_finite()).map(|i| (i, x[i]))
}

/// The [`Error::NonFinite`](crate::Error::NonFinite) of `value` at flat index `i` of a
/// `[rows, cols]` tensor, `at(row)` naming the row.
pub(crate) fn nonfinite(
    i: usize,
    value: f32,
    cols: usize,
    at: impl FnOnce(usize) -> String,
) -> crate::Error {
    let cols = cols.max(1);
    crate::Error::NonFinite {
        at: format!("{}, column {}", at(i / cols), i % cols),
        value,
    }
}
