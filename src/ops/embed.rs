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
        out.extend(table.rows_f32(id, id + 1)?);
    }
    Ok(out)
}

/// Backward of [`embed`]: scatter-adds row `r` of `dy: [ids.len(), d]` into row `ids[r]` of
/// `dtable: [vocab, d]` (a repeated id accumulates). An id outside the vocabulary is an error and
/// leaves `dtable` untouched.
pub fn embed_backward(ids: &[u32], dy: &[f32], d: usize, dtable: &mut [f32]) -> Result<()> {
    if d == 0 || dy.len() != ids.len() * d || !dtable.len().is_multiple_of(d) {
        return Err(Error::Shape {
            name: "embed_backward dy".into(),
            expected: vec![ids.len(), d],
            got: vec![dy.len()],
        });
    }
    let vocab = dtable.len() / d;
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::arg(
            "token id",
            format!("{id} is outside the vocabulary of {vocab}"),
        ));
    }
    for (&id, g) in ids.iter().zip(dy.chunks(d)) {
        for (t, g) in dtable[id as usize * d..][..d].iter_mut().zip(g) {
            *t += g;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::*;

    #[test]
    fn backward_matches_finite_differences() {
        let (vocab, d) = (7, 5);
        let ids = [3u32, 0, 3, 6, 1, 3];
        let mut rng = Rng::new(4);
        let (table, r) = (rng.vec(vocab * d), rng.vec(ids.len() * d));
        let fwd = |t: &[f64]| -> Vec<f64> {
            ids.iter()
                .flat_map(|&i| t[i as usize * d..][..d].to_vec())
                .collect()
        };
        let tt = Tensor::from_f32(&[vocab, d], table.clone()).unwrap();
        check(
            "embed fwd",
            &embed(&tt, &ids).unwrap(),
            &fwd(&f64s(&table)),
            1e-6,
        );
        let mut dt = vec![0.0f32; vocab * d];
        embed_backward(&ids, &r, d, &mut dt).unwrap();
        let want = fd(|t| dot(&fwd(t), &r), &f64s(&table), 1e-6);
        check("embed dtable", &dt, &want, 1e-6);
        assert!(embed_backward(&[7], &r[..d], d, &mut dt).is_err());
    }
}
