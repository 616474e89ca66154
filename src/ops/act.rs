//! Activations.

use crate::error::{Error, Result};

/// Fails unless the backward's operands have one length.
fn same_len(op: &str, lens: &[usize]) -> Result<()> {
    match lens.iter().all(|&n| n == lens[0]) {
        true => Ok(()),
        false => Err(Error::Shape {
            name: format!("{op} operands"),
            expected: vec![lens[0]; lens.len()],
            got: lens.to_vec(),
        }),
    }
}

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

/// `σ(x)`.
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Backward of [`silu_mul`] (`out = silu(g) ⊙ u`): with `s = σ(g)`,
/// `dgate = dy ⊙ u ⊙ s·(1 + g·(1 − s))` and `dup = dy ⊙ g·s`. Returns `(dgate, dup)`.
pub fn silu_mul_backward(gate: &[f32], up: &[f32], dy: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
    same_len("silu_mul_backward", &[gate.len(), up.len(), dy.len()])?;
    let mut dgate = Vec::with_capacity(gate.len());
    let mut dup = Vec::with_capacity(gate.len());
    for ((&g, &u), &d) in gate.iter().zip(up).zip(dy) {
        let s = sigmoid(g);
        dgate.push(d * u * s * (1.0 + g * (1.0 - s)));
        dup.push(d * g * s);
    }
    Ok((dgate, dup))
}

/// Backward of exact [`gelu`]: `dx = dy · (Φ(x) + x·φ(x))`, `Φ(x) = (1 + erf(x/√2))/2`,
/// `φ(x) = exp(−x²/2)/√(2π)`.
pub fn gelu_backward(x: &[f32], dy: &[f32]) -> Result<Vec<f32>> {
    same_len("gelu_backward", &[x.len(), dy.len()])?;
    let inv_sqrt_2pi = 0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2;
    Ok(x.iter()
        .zip(dy)
        .map(|(&x, &d)| {
            let x = x as f64;
            let cdf = 0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * x * x).exp() * inv_sqrt_2pi;
            d * (cdf + x * pdf) as f32
        })
        .collect())
}

/// Backward of [`quick_gelu`] (`x·σ(1.702x)`): `dx = dy · (s + 1.702·x·s·(1 − s))`, `s = σ(1.702x)`.
pub fn quick_gelu_backward(x: &[f32], dy: &[f32]) -> Result<Vec<f32>> {
    same_len("quick_gelu_backward", &[x.len(), dy.len()])?;
    Ok(x.iter()
        .zip(dy)
        .map(|(&x, &d)| {
            let s = sigmoid(1.702 * x);
            d * (s + 1.702 * x * s * (1.0 - s))
        })
        .collect())
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

    #[test]
    fn backward_matches_finite_differences() {
        use crate::ops::gradcheck::*;
        let n = 37;
        let mut rng = Rng::new(3);
        // Inputs spread over [-4, 4] so both tails of the activations are exercised.
        let x: Vec<f32> = rng.vec(n).iter().map(|v| 4.0 * v).collect();
        let u = rng.vec(n);
        let r = rng.vec(n);
        let (xd, ud) = (f64s(&x), f64s(&u));
        let h = 1e-6;
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let silu64 = |g: &[f64], u: &[f64]| -> Vec<f64> {
            g.iter().zip(u).map(|(g, u)| g * sig(*g) * u).collect()
        };
        let mut got = x.clone();
        silu_mul(&mut got, &u);
        check("silu_mul fwd", &got, &silu64(&xd, &ud), 1e-5);
        let (dg, du) = silu_mul_backward(&x, &u, &r).unwrap();
        assert!(silu_mul_backward(&x, &u[1..], &r).is_err());
        check(
            "silu_mul dgate",
            &dg,
            &fd(|g| dot(&silu64(g, &ud), &r), &xd, h),
            1e-5,
        );
        check(
            "silu_mul dup",
            &du,
            &fd(|u| dot(&silu64(&xd, u), &r), &ud, h),
            1e-5,
        );

        let gelu64 = |x: &[f64]| -> Vec<f64> {
            x.iter()
                .map(|x| 0.5 * x * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2)))
                .collect()
        };
        let mut got = x.clone();
        gelu(&mut got);
        check("gelu fwd", &got, &gelu64(&xd), 1e-5);
        let dx = gelu_backward(&x, &r).unwrap();
        check("gelu dx", &dx, &fd(|x| dot(&gelu64(x), &r), &xd, h), 1e-5);

        let qg64 = |x: &[f64]| -> Vec<f64> { x.iter().map(|x| x * sig(1.702 * x)).collect() };
        let mut got = x.clone();
        quick_gelu(&mut got);
        check("quick_gelu fwd", &got, &qg64(&xd), 1e-5);
        let dx = quick_gelu_backward(&x, &r).unwrap();
        check(
            "quick_gelu dx",
            &dx,
            &fd(|x| dot(&qg64(x), &r), &xd, h),
            1e-5,
        );
    }
}
