//! A linear projection's tensors — weight, bias, LoRA adapter — and the LoRA update
//! `scale · B·A·dropout(x)` (PEFT's LoRA, checked against PyPI `peft` in
//! `tests/python/test_peft_parity.py`).

use candle_core::{DType, Result, Tensor};

use super::{fused, Kernels, Llama};

use crate::params::Params;

/// A projection `x·Wᵀ (+ b)`, with an optional low-rank adapter beside `W`.
pub(super) struct Projection {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

/// The two factors of a LoRA adapter: `a: (rank, in)`, `b: (out, rank)`.
pub(super) struct Lora {
    pub a: Tensor,
    pub b: Tensor,
}

/// How an adapted model applies its adapters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraSettings {
    /// `alpha / rank` (or `alpha / √rank`).
    pub scale: f64,
    /// Probability of zeroing an element of an adapter's input while training.
    pub dropout: f64,
}

/// A parameter's tensor, as a candle error when it is missing.
pub(super) fn get(params: &Params, name: &str) -> Result<Tensor> {
    params.tensor(name).map_err(candle_core::Error::wrap)
}

impl Projection {
    /// The projection `module` (e.g. `model.layers.0.self_attn.q_proj`), with its bias when
    /// `bias` and its adapter when `params` holds one.
    pub fn load(params: &Params, module: &str, bias: bool) -> Result<Self> {
        let lora = if params.contains(&format!("{module}.lora_A.weight")) {
            Some(Lora {
                a: get(params, &format!("{module}.lora_A.weight"))?,
                b: get(params, &format!("{module}.lora_B.weight"))?,
            })
        } else {
            None
        };
        Ok(Projection {
            weight: get(params, &format!("{module}.weight"))?,
            bias: bias.then(|| get(params, &format!("{module}.bias"))).transpose()?,
            lora,
        })
    }

    /// The same projection over detached tensors (no backward graph).
    pub fn detach(&self) -> Self {
        Projection {
            weight: self.weight.detach(),
            bias: self.bias.as_ref().map(Tensor::detach),
            lora: self.lora.as_ref().map(|l| Lora { a: l.a.detach(), b: l.b.detach() }),
        }
    }

    /// Output features.
    pub fn out_features(&self) -> Result<usize> {
        self.weight.dim(0)
    }
}

/// `x` with each element zeroed with probability `p` and the rest scaled by `1 / (1 − p)`, from a
/// generator seeded by `seed`: the same seed gives the same mask, so a resumed run repeats it.
pub(super) fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    let mask = super::fused::dropout_mask(x.elem_count(), p, seed);
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}

/// A seed for one dropout site of one forward pass: a SplitMix64 mix of both.
pub(super) fn site_seed(pass: u64, site: usize) -> u64 {
    let mut z = pass ^ (site as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The biases of projections run as one product, concatenated; `None` unless every one has a bias.
fn packed_bias(parts: &[&Projection]) -> Result<Option<Tensor>> {
    let biases: Option<Vec<&Tensor>> = parts.iter().map(|p| p.bias.as_ref()).collect();
    biases.map(|b| Tensor::cat(&b, 0)).transpose()
}

/// Zeros shaped like `x` with its last dimension `features`, for a part with no adapter.
pub(super) fn zeros_like_output(x: &Tensor, features: usize) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("activations have a feature dimension") = features;
    Tensor::zeros(dims, x.dtype(), x.device())
}

/// Whether a weight is frozen in half precision (the CPU kernels widen those themselves).
pub(super) fn is_frozen_half(weight: &Tensor) -> bool {
    matches!(weight.dtype(), DType::BF16 | DType::F16) && !weight.track_op()
}

impl Llama {
    /// A projection with its adapter's update added; `site` numbers its dropout mask.
    pub(super) fn project(&self, k: Kernels, x: &Tensor, p: &Projection, site: usize) -> Result<Tensor> {
        if k == Kernels::Cpu && p.lora.is_some() && !p.weight.track_op() {
            return self.fused_lora(x, &p.weight, &[p], site);
        }
        let y = self.linear(k, x, &p.weight, p.bias.as_ref())?;
        match self.lora_update(k, x, p, site)? {
            Some(update) => y + update,
            None => Ok(y),
        }
    }

    /// `scale · dropout(x)·Aᵀ·Bᵀ` of a projection's adapter, if it has one.
    pub(super) fn lora_update(&self, k: Kernels, x: &Tensor, p: &Projection, site: usize) -> Result<Option<Tensor>> {
        let Some(lora) = &p.lora else { return Ok(None) };
        let x = match self.dropout_seed(site) {
            Some(seed) => dropout(x, self.lora.dropout, seed)?,
            None => x.clone(),
        };
        let down = self.linear(k, &x, &lora.a, None)?;
        Ok(Some((self.linear(k, &down, &lora.b, None)? * self.lora.scale)?))
    }

    /// Projections that read the same input as one product over their concatenated weights
    /// (`packed` when they are frozen), each adapter's update added to its own columns.
    pub(super) fn packed(
        &self,
        k: Kernels,
        x: &Tensor,
        parts: &[&Projection],
        packed: Option<&Tensor>,
        site: usize,
    ) -> Result<Tensor> {
        let weight = match packed {
            Some(packed) => packed.clone(),
            None => Tensor::cat(&parts.iter().map(|p| &p.weight).collect::<Vec<_>>(), 0)?,
        };
        let adapted = parts.iter().any(|p| p.lora.is_some());
        if k == Kernels::Cpu && adapted && !weight.track_op() {
            return self.fused_lora(x, &weight, parts, site);
        }
        let y = self.linear(k, x, &weight, packed_bias(parts)?.as_ref())?;
        if !adapted {
            return Ok(y);
        }
        let updates = parts
            .iter()
            .enumerate()
            .map(|(i, p)| match self.lora_update(k, x, p, site + i)? {
                Some(update) => Ok(update),
                None => zeros_like_output(x, p.out_features()?),
            })
            .collect::<Result<Vec<_>>>()?;
        y + Tensor::cat(&updates, x.rank() - 1)?
    }

    /// Frozen projections reading `x`, with `weight` their (packed) weight, and their adapters as
    /// one CPU op (see [`fused::lora_linear`]).
    pub(super) fn fused_lora(&self, x: &Tensor, weight: &Tensor, parts: &[&Projection], site: usize) -> Result<Tensor> {
        let adapters: Vec<_> = parts.iter().filter_map(|p| p.lora.as_ref()).collect();
        let a = Tensor::cat(&adapters.iter().map(|l| &l.a).collect::<Vec<_>>(), 0)?;
        let b = Tensor::cat(&adapters.iter().map(|l| &l.b).collect::<Vec<_>>(), 0)?;
        let blocks = parts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let seed = p.lora.as_ref().map(|_| self.dropout_seed(site + i));
                Ok(fused::Block { columns: p.out_features()?, adapter: seed })
            })
            .collect::<Result<Vec<_>>>()?;
        let y = fused::lora_linear(x, &self.cpu_w(weight)?, &a, &b, blocks, self.lora.scale, self.lora.dropout)?;
        match packed_bias(parts)? {
            Some(bias) => y.broadcast_add(&self.w(&bias)?),
            None => Ok(y),
        }
    }

    /// The seed of the dropout mask at `site` in this forward pass; `None` when no dropout applies
    /// (evaluation, or a dropout of 0).
    fn dropout_seed(&self, site: usize) -> Option<u64> {
        self.dropout_pass.filter(|_| self.lora.dropout > 0.0).map(|pass| site_seed(pass, site))
    }
}
