//! CPU ops, one file per family. Activations are f32 row-major `[rows, cols]` slices; weights are
//! [`Tensor`](crate::Tensor)s in their stored dtype, converted to f32 per call.

pub mod act;
pub mod attention;
pub mod embed;
#[cfg(test)]
pub(crate) mod gradcheck;
pub mod kd;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod rope;

/// `x += y` elementwise (residual connections).
pub fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
