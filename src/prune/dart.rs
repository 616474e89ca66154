//! DART (Wen et al. 2025, "Stop Looking for Important Tokens in Multimodal Language Models:
//! Duplication Matters More"): at layer K, keep a few pivot tokens and the image tokens least
//! duplicated with them. No attention scores are needed, so it works with fused attention.
//!
//! Exact to the official code, `llava/model/language_model/modeling_llama_self.py` of
//! github.com/ZichenWen1/DART (`LlamaModel.forward`, lines 333-357, and
//! `get_retained_image_token`, lines 397-449; defaults from `llava/eval/model_vqa_loader.py`,
//! lines 172-179):
//!
//! 1. Before layer K runs, take layer K-1's output through the model's final RMSNorm
//!    (`last_layer_state = self.norm(layer_outputs[0])`) and layer K-1's keys after RoPE, all
//!    key/value heads concatenated (`any_states`).
//! 2. Pivots: the `image_pivots` image tokens and the `text_pivots` tokens after the image
//!    (everything from the end of the image to the end of the prompt) with the largest L1 norm
//!    of their keys.
//! 3. `per_pivot = budget // (image_pivots + text_pivots)` (the code's `TOKEN_TOPK`, with the
//!    budget its `max_num_trunction`). For each pivot in turn, the `per_pivot` image tokens not
//!    chosen yet whose normed states have the *lowest* cosine similarity to the pivot's are
//!    kept.
//! 4. The kept image tokens: the image pivots and every token chosen in 3 (the text pivots are
//!    not image tokens). A budget `M` thus keeps `image_pivots + P · ⌊M / P⌋` tokens (132 for
//!    the paper's 128 with 4 + 4 pivots), as the official code does.
//!
//! The budget is capped at `n - image_pivots` for `n` image tokens, as the official code caps
//! LLaVA-NeXT's (`min(retain_token_num_for_llava_next, image_token_length -
//! pivot_image_token)`, lines 413-417). Its LLaVA-1.5 path has no cap, but a larger budget fails
//! there (a pivot's `topk` asks for more tokens than remain), so the cap changes no budget the
//! official code runs.
//!
//! The pivots are visited in the order the code's `list(indices_set)` gives them: CPython's
//! iteration order of `set(image_pivots + text_pivots)` (both lists largest norm first), which
//! is a hash-table order, not position order; [`python_set_order`] reproduces it, so the kept
//! sets are the official code's. Ties (in a norm or a similarity) go to the lower position,
//! where `torch.topk`'s order is unspecified.

/// DART's settings (the official defaults: 4 image pivots, 4 text pivots, K = 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dart {
    pub image_pivots: usize,
    pub text_pivots: usize,
}

impl Default for Dart {
    fn default() -> Self {
        Dart {
            image_pivots: 4,
            text_pivots: 4,
        }
    }
}

impl Dart {
    /// Image tokens a budget of `budget` keeps out of `n` (step 4 above, the budget capped at
    /// `n - image_pivots`), at most `n`.
    pub fn kept_count(&self, budget: usize, n: usize) -> usize {
        let p = (self.image_pivots + self.text_pivots).max(1);
        (self.image_pivots + p * (self.capped(budget, n) / p)).min(n)
    }

    /// The budget capped at `n - image_pivots` (the official LLaVA-NeXT cap).
    fn capped(&self, budget: usize, n: usize) -> usize {
        budget.min(n.saturating_sub(self.image_pivots))
    }

    /// The kept image tokens, as indices into `image_rows` (ascending), and each image token's
    /// key L1 norm (the pivot criterion, reported as its importance).
    ///
    /// `keys`: `[rows, kv_width]` layer K-1's keys after RoPE; `states`: `[rows, hidden]` layer
    /// K-1's output through the final norm (`(kv_width, hidden)` = `widths`); `image_rows`: the
    /// image tokens' rows (ascending); `text_rows`: the rows after the last image token.
    pub fn select(
        &self,
        (keys, states): (&[f32], &[f32]),
        (kw, h): (usize, usize),
        image_rows: &[usize],
        text_rows: &[usize],
        budget: usize,
    ) -> (Vec<usize>, Vec<f32>) {
        let l1 = |r: usize| {
            keys[r * kw..(r + 1) * kw]
                .iter()
                .map(|x| x.abs())
                .sum::<f32>()
        };
        let image_norms: Vec<f32> = image_rows.iter().map(|&r| l1(r)).collect();
        let text_norms: Vec<f32> = text_rows.iter().map(|&r| l1(r)).collect();
        // Pivots, largest norm first (torch.topk's order), as indices into their lists.
        let image_pivots = largest(&image_norms, self.image_pivots);
        let text_pivots = largest(&text_norms, self.text_pivots);
        let p = self.image_pivots + self.text_pivots;
        let per_pivot = self.capped(budget, image_rows.len()) / p.max(1);
        let pivot_rows: Vec<usize> = (image_pivots.iter().map(|&i| image_rows[i]))
            .chain(text_pivots.iter().map(|&i| text_rows[i]))
            .collect();
        let mut kept = vec![false; image_rows.len()];
        for &i in &image_pivots {
            kept[i] = true;
        }
        let state = |r: usize| &states[r * h..(r + 1) * h];
        for pivot in python_set_order(&pivot_rows) {
            let valid: Vec<usize> = (0..image_rows.len()).filter(|&i| !kept[i]).collect();
            // -cos: the least similar first.
            let dissimilarity: Vec<f32> = (valid.iter())
                .map(|&i| -cosine(state(pivot), state(image_rows[i])))
                .collect();
            for j in largest(&dissimilarity, per_pivot) {
                kept[valid[j]] = true;
            }
        }
        let kept = (0..image_rows.len()).filter(|&i| kept[i]).collect();
        (kept, image_norms)
    }
}

/// Indices of the `k` largest of `x` (at most all of them), largest first, ties to the lower
/// index.
fn largest(x: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// `torch.nn.functional.cosine_similarity` of two vectors: `a·b / max(‖a‖·‖b‖, 1e-8)`.
fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb).max(1e-8)
}

/// The order CPython (3.7 to 3.13) iterates `set(values)` in, for non-negative integers below
/// 2^61 (whose hash is the value itself): `values` inserted in order into an open-addressing
/// table of 8 slots (`PySet_MINSIZE`), probed linearly 9 slots at a time and then by
/// `i = 5i + 1 + perturb` (`perturb >>= 5`), resized to the smallest power of two above 4x the
/// used slots once they fill 3/5 of it; iteration walks the table's slots in order
/// (`Objects/setobject.c`: `set_add_entry`, `set_table_resize`, `set_insert_clean`).
/// Duplicates are kept once.
pub fn python_set_order(values: &[usize]) -> Vec<usize> {
    fn slot(table: &[Option<usize>], v: usize) -> usize {
        let mask = table.len() - 1;
        let (mut i, mut perturb) = (v & mask, v);
        loop {
            let probes = if i + 9 <= mask { 9 } else { 0 };
            if let Some(j) = (i..=i + probes).find(|&j| table[j].is_none_or(|x| x == v)) {
                return j;
            }
            perturb >>= 5;
            i = (i * 5 + 1 + perturb) & mask;
        }
    }
    let mut table: Vec<Option<usize>> = vec![None; 8];
    let mut used = 0;
    for &v in values {
        let s = slot(&table, v);
        if table[s].is_some() {
            continue;
        }
        table[s] = Some(v);
        used += 1;
        if used * 5 >= (table.len() - 1) * 3 {
            let min = if used > 50000 { used * 2 } else { used * 4 };
            let mut size = 8;
            while size <= min {
                size <<= 1;
            }
            let old = std::mem::replace(&mut table, vec![None; size]);
            for v in old.into_iter().flatten() {
                let s = slot(&table, v);
                table[s] = Some(v);
            }
        }
    }
    table.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_set_order_by_hand() {
        // Below the table size: ascending.
        assert_eq!(python_set_order(&[5, 1, 3]), vec![1, 3, 5]);
        // The 5th value fills an 8-slot table past 3/5: 32 slots, so 33 (slot 1) comes before
        // 35 (slot 3) and 40 (slot 8); 65 collides with 33 and probes to slot 2, 8 with 40 to
        // slot 9, pushing 9 and 10 on (Python: `list(set([40, 35, 33, 65, 7, 8, 9, 10]))`).
        assert_eq!(
            python_set_order(&[40, 35, 33, 65, 7, 8, 9, 10]),
            vec![33, 65, 35, 7, 40, 8, 9, 10]
        );
        assert_eq!(python_set_order(&[3, 3, 1]), vec![1, 3]);
    }

    #[test]
    fn selection_by_hand() {
        // 1 image pivot + 1 text pivot, budget 2: one pick per pivot. Keys (width 1): image rows
        // 0..4 with L1 norms 1, 5, 2, 3; text row 4 (norm 9). States (width 2).
        let keys = [1.0, -5.0, 2.0, 3.0, 9.0];
        let states = [
            1.0, 0.0, // row 0
            1.0, 0.0, // row 1: the image pivot
            0.0, 1.0, // row 2
            -1.0, 0.1, // row 3
            0.0, 1.0, // row 4: the text pivot
        ];
        let d = Dart {
            image_pivots: 1,
            text_pivots: 1,
        };
        let (kept, norms) = d.select((&keys, &states), (1, 2), &[0, 1, 2, 3], &[4], 2);
        assert_eq!(norms, vec![1.0, 5.0, 2.0, 3.0]);
        // Pivots visited 1 then 4: row 1 picks the least similar to (1, 0), row 3 (cos -0.995);
        // row 4 then picks the least similar to (0, 1) among rows 0 and 2, row 0 (cos 0).
        assert_eq!(kept, vec![0, 1, 3]);
        assert_eq!(d.kept_count(2, 4), 3);
        assert_eq!(Dart::default().kept_count(128, 576), 132);
        // Budgets are capped at n - image pivots: 208 of 205 tokens is 201, so 4 + 8 x 25.
        assert_eq!(Dart::default().kept_count(208, 205), 204);
        // Budget 5 of 4 tokens is capped at 3 (4 - 1 pivot): one pick per pivot, as with
        // budget 2 (uncapped, each pivot would ask for two).
        let (kept, _) = d.select((&keys, &states), (1, 2), &[0, 1, 2, 3], &[4], 5);
        assert_eq!(kept, vec![0, 1, 3]);
        assert_eq!(d.kept_count(5, 4), 3);
    }
}
