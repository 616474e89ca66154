//! Rotary position embedding, rotate-half form (HF `apply_rotary_pos_emb`).

/// Inverse frequencies `1 / theta^(2i/d)` for `i < d/2`, computed in f32 as HF does.
pub fn inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

/// Rotates `x: [rows, heads, d]` in place; row `r` sits at position `positions[r]`:
/// `(x₁, x₂) ← (x₁ cos θ − x₂ sin θ, x₂ cos θ + x₁ sin θ)` with x₁/x₂ the two halves of each head.
pub fn rope(x: &mut [f32], heads: usize, d: usize, positions: &[usize], inv_freq: &[f32]) {
    rotate(x, heads, d, positions, inv_freq, 1.0);
}

/// Backward of [`rope`], in place on `dy: [rows, heads, d]`: the rotation is orthogonal, so
/// the gradient is `dy` rotated by `−θ`:
/// `(g₁, g₂) ← (g₁ cos θ + g₂ sin θ, g₂ cos θ − g₁ sin θ)`, with θ computed exactly as the forward does.
pub fn rope_backward(
    dy: &mut [f32],
    heads: usize,
    d: usize,
    positions: &[usize],
    inv_freq: &[f32],
) {
    rotate(dy, heads, d, positions, inv_freq, -1.0);
}

/// Rotates each head's halves by `sign · θ` (`sign` is ±1, so the products are exact).
fn rotate(x: &mut [f32], heads: usize, d: usize, positions: &[usize], inv_freq: &[f32], sign: f32) {
    let half = d / 2;
    for (row, &pos) in x.chunks_mut(heads * d).zip(positions) {
        let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
            .iter()
            .map(|f| {
                let a = pos as f32 * f;
                (a.cos(), sign * a.sin())
            })
            .unzip();
        for h in row.chunks_mut(d) {
            for i in 0..half {
                let (a, b) = (h[i], h[i + half]);
                h[i] = a * cos[i] - b * sin[i];
                h[i + half] = b * cos[i] + a * sin[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_position_angle() {
        let f = inv_freq(4, 10000.0);
        assert_eq!(f[0], 1.0);
        let mut x = vec![1.0, 0.0, 0.0, 0.0];
        rope(&mut x, 1, 4, &[2], &f);
        assert!((x[0] - 2f32.cos()).abs() < 1e-6 && (x[2] - 2f32.sin()).abs() < 1e-6);
        let norm: f32 = x.iter().map(|v| v * v).sum();
        assert!((norm - 1.0).abs() < 1e-6);
    }

    #[test]
    fn backward_matches_finite_differences() {
        use crate::ops::gradcheck::*;
        let (rows, heads, d) = (5, 3, 10);
        let f = inv_freq(d, 10000.0);
        let positions = [0usize, 3, 4, 17, 250];
        let mut rng = Rng::new(5);
        let (x, r) = (rng.vec(rows * heads * d), rng.vec(rows * heads * d));
        // The angles are taken from the f32 forward's own arithmetic, so the f64 transcription
        // rotates by the same angles.
        let fwd = |x: &[f64]| -> Vec<f64> {
            let mut y = x.to_vec();
            for (row, &pos) in y.chunks_mut(heads * d).zip(&positions) {
                for hd in row.chunks_mut(d) {
                    for i in 0..d / 2 {
                        let a = (pos as f32 * f[i]) as f64;
                        let (c, s) = (a.cos(), a.sin());
                        let (u, v) = (hd[i], hd[i + d / 2]);
                        hd[i] = u * c - v * s;
                        hd[i + d / 2] = v * c + u * s;
                    }
                }
            }
            y
        };
        let mut got = x.clone();
        rope(&mut got, heads, d, &positions, &f);
        check("rope fwd", &got, &fwd(&f64s(&x)), 1e-5);
        let mut g = r.clone();
        rope_backward(&mut g, heads, d, &positions, &f);
        check(
            "rope dx",
            &g,
            &fd(|x| dot(&fwd(x), &r), &f64s(&x), 1e-6),
            1e-5,
        );
    }
}
