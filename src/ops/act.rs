//! Activations.

/// SiLU-gated MLP core (LLaMA): `out = silu(gate) ⊙ up`, with `silu(x) = x·σ(x)`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Exact GELU (`nn.functional.gelu`, approximate="none"): `x/2 · (1 + erf(x/√2))`.
pub fn gelu(x: &mut [f32]) {
    for v in x {
        *v = 0.5 * *v * (1.0 + libm::erf(*v as f64 * std::f64::consts::FRAC_1_SQRT_2) as f32);
    }
}

/// CLIP's quick GELU: `x · σ(1.702 x)`.
pub fn quick_gelu(x: &mut [f32]) {
    for v in x {
        *v *= 1.0 / (1.0 + (-1.702 * *v).exp());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        let mut x = [1.0f32, -2.0];
        gelu(&mut x);
        assert!((x[0] - 0.841_344_7).abs() < 1e-6 && (x[1] + 0.045_500_26).abs() < 1e-6);
        let mut g = [1.0f32];
        silu_mul(&mut g, &[2.0]);
        assert!((g[0] - 2.0 * 0.731_058_6).abs() < 1e-6);
        let mut q = [1.0f32];
        quick_gelu(&mut q);
        assert!((q[0] - 0.845_795_4).abs() < 1e-6);
    }
}
