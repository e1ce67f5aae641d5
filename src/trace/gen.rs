//! `cudalloc trace-gen`: synthetic traces that model real workloads, each
//! deterministic for its seed.
//!
//! - [`random_allocations`]: RMM's benchmark: 73% allocate (uniform sizes up
//!   to a maximum, while under a usage cap) / 27% free a random live block.
//! - [`training`]: a transformer training loop: persistent parameters,
//!   Adam state created at the first step, per-step activations whose size
//!   follows a random sequence length, saved for backward and freed in
//!   reverse, gradients freed by `zero_grad(set_to_none=True)`.
//! - [`kv_cache`]: LLM inference: weights, then requests arriving and
//!   finishing, each with a per-layer K and V cache that grows by
//!   reallocation (new bigger buffer, copy, free the old one, as `torch.cat`
//!   does), plus per-token temporaries.
//! - [`sawtooth`]: the fragmenting cycle: requests of 1 to 9.5 MiB, every
//!   other one freed, then requests of 12 to 17 MiB that fit none of the
//!   holes, then everything freed.

use super::Event;
use crate::observe::tracelog::Action;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

/// Builds a trace with unique fake addresses and a synthetic clock.
struct Builder {
    events: Vec<Event>,
    next_ptr: u64,
    now_us: u64,
    stream: u64,
}

impl Builder {
    fn new() -> Self {
        Builder {
            events: Vec::new(),
            next_ptr: 0x7f00_0000_0000,
            now_us: 1_000_000,
            stream: 0,
        }
    }

    fn alloc(&mut self, size: u64) -> (u64, u64) {
        let ptr = self.next_ptr;
        self.next_ptr += size.div_ceil(512) * 512 + 512;
        self.push(Action::Allocate, ptr, size);
        (ptr, size)
    }

    fn free(&mut self, (ptr, size): (u64, u64)) {
        self.push(Action::Free, ptr, size);
    }

    fn push(&mut self, action: Action, ptr: u64, size: u64) {
        self.now_us += 2;
        self.events.push(Event {
            thread: 1,
            time_us: self.now_us,
            action,
            ptr,
            size,
            stream: self.stream,
        });
    }

    fn wait_us(&mut self, us: u64) {
        self.now_us += us;
    }
}

/// RMM's random_allocations: `ops` operations, sizes uniform in `1..=max`,
/// live bytes capped at `max_usage`.
pub fn random_allocations(seed: u64, ops: u64, max: u64, max_usage: u64) -> Vec<Event> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut b = Builder::new();
    let mut live: Vec<(u64, u64)> = Vec::new();
    let mut usage = 0u64;
    for _ in 0..ops {
        let size = rng.random_range(1..=max);
        if live.is_empty() || (rng.random::<f64>() < 0.73 && usage + size <= max_usage) {
            live.push(b.alloc(size));
            usage += size;
        } else {
            let i = rng.random_range(0..live.len());
            let x = live.swap_remove(i);
            usage -= x.1;
            b.free(x);
        }
        b.wait_us(rng.random_range(1..20));
    }
    for x in live {
        b.free(x);
    }
    b.events
}

/// Shape of the modelled transformer.
#[derive(Debug, Clone, Copy)]
pub struct Model {
    pub layers: u64,
    pub hidden: u64,
    pub heads: u64,
    pub vocab: u64,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            layers: 6,
            hidden: 1024,
            heads: 16,
            vocab: 32_000,
        }
    }
}

impl Model {
    /// Parameter tensor sizes in elements: embedding, then per layer
    /// ln1 (w, b), qkv (w, b), proj (w, b), ln2 (w, b), fc1 (w, b), fc2 (w, b), then final ln.
    fn params(&self) -> Vec<u64> {
        let h = self.hidden;
        let mut v = vec![self.vocab * h];
        for _ in 0..self.layers {
            v.extend([
                h,
                h,
                3 * h * h,
                3 * h,
                h * h,
                h,
                h,
                h,
                4 * h * h,
                4 * h,
                4 * h * h,
                h,
            ]);
        }
        v.extend([h, h]);
        v
    }
}

/// A transformer training run of `steps` steps (fp32 weights and Adam state,
/// fp16 activations), batch 4, sequence length uniform in 128..=1024 (step 64).
pub fn training(seed: u64, steps: u64, m: Model) -> Vec<Event> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut b = Builder::new();
    let (h, batch) = (m.hidden, 4u64);
    let params: Vec<(u64, u64)> = m.params().iter().map(|&n| b.alloc(n * 4)).collect();
    let mut adam: Vec<(u64, u64)> = Vec::new();
    for step in 0..steps {
        let s = 64 * rng.random_range(2..=16u64);
        let tok = batch * s;
        // Forward: activations saved for backward, temporaries freed at once.
        let mut saved: Vec<Vec<(u64, u64)>> = Vec::new();
        let x = b.alloc(tok * h * 2);
        for _ in 0..m.layers {
            let mut keep = vec![b.alloc(tok * h * 2), b.alloc(tok * 3 * h * 2)];
            let scores = b.alloc(batch * m.heads * s * s * 2);
            keep.push(b.alloc(batch * m.heads * s * s * 2)); // softmax output
            b.free(scores);
            keep.push(b.alloc(tok * h * 2)); // attention output
            let proj = b.alloc(tok * h * 2);
            keep.push(b.alloc(tok * h * 2)); // ln2
            keep.push(b.alloc(tok * 4 * h * 2)); // fc1
            keep.push(b.alloc(tok * 4 * h * 2)); // gelu
            b.free(proj);
            keep.push(b.alloc(tok * h * 2)); // residual out
            saved.push(keep);
        }
        let logits = b.alloc(tok * m.vocab * 2);
        let loss = b.alloc(4);
        // Backward: gradient of the logits, then the layers in reverse.
        let glogits = b.alloc(tok * m.vocab * 2);
        b.free(logits);
        let mut grads: Vec<(u64, u64)> = Vec::new();
        grads.push(b.alloc(params[0].1));
        b.free(glogits);
        let mut gx = b.alloc(tok * h * 2);
        let per_layer = 12usize;
        for l in (0..m.layers as usize).rev() {
            let g1 = b.alloc(tok * 4 * h * 2);
            let g2 = b.alloc(tok * 4 * h * 2);
            for p in &params[1 + l * per_layer..1 + (l + 1) * per_layer] {
                grads.push(b.alloc(p.1));
            }
            let gs = b.alloc(batch * m.heads * s * s * 2);
            b.free(g1);
            b.free(g2);
            b.free(gs);
            for a in saved.pop().unwrap_or_default().into_iter().rev() {
                b.free(a);
            }
            let next = b.alloc(tok * h * 2);
            b.free(gx);
            gx = next;
        }
        b.free(gx);
        b.free(x);
        b.free(loss);
        // Optimizer: Adam state on the first step, foreach temporaries each step.
        if step == 0 {
            for p in &params {
                adam.push(b.alloc(p.1));
                adam.push(b.alloc(p.1));
            }
        }
        for p in &params {
            let t = b.alloc(p.1);
            b.free(t);
        }
        for g in grads {
            b.free(g);
        }
        b.wait_us(rng.random_range(50_000..150_000));
    }
    for x in adam.into_iter().chain(params) {
        b.free(x);
    }
    b.events
}

/// LLM inference with a growing KV cache: `requests` requests, at most 8 at
/// a time, prompts of 32..=1024 tokens, 16..=256 generated tokens each; fp16
/// weights; per-layer K and V grow in chunks of 256 tokens by reallocation.
pub fn kv_cache(seed: u64, requests: u64, m: Model) -> Vec<Event> {
    const CHUNK: u64 = 256;
    struct Req {
        len: u64,
        left: u64,
        cap: u64,
        kv: Vec<(u64, u64)>,
    }
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut b = Builder::new();
    let h = m.hidden;
    let weights: Vec<(u64, u64)> = m.params().iter().map(|&n| b.alloc(n * 2)).collect();
    let mut active: Vec<Req> = Vec::new();
    let mut started = 0u64;
    while started < requests || !active.is_empty() {
        // Admit new requests (prefill: temporaries the size of the prompt).
        while active.len() < 8
            && started < requests
            && (active.is_empty() || rng.random::<f64>() < 0.3)
        {
            started += 1;
            let p = rng.random_range(32..=1024u64);
            let cap = p.div_ceil(CHUNK) * CHUNK;
            let kv: Vec<(u64, u64)> = (0..2 * m.layers).map(|_| b.alloc(cap * h * 2)).collect();
            let t1 = b.alloc(p * 4 * h * 2);
            let t2 = b.alloc(p * m.heads * p.min(1024) * 2);
            b.free(t2);
            b.free(t1);
            active.push(Req {
                len: p,
                left: rng.random_range(16..=256),
                cap,
                kv,
            });
        }
        // One decode step for the batch.
        let n = active.len() as u64;
        let act = b.alloc(n * h * 2);
        let mlp = b.alloc(n * 4 * h * 2);
        let logits = b.alloc(n * m.vocab * 2);
        b.free(mlp);
        b.free(logits);
        b.free(act);
        for r in active.iter_mut() {
            r.len += 1;
            r.left -= 1;
            if r.len > r.cap {
                r.cap += CHUNK;
                for slot in r.kv.iter_mut() {
                    let bigger = b.alloc(r.cap * h * 2);
                    b.free(*slot);
                    *slot = bigger;
                }
            }
        }
        let mut i = 0;
        while i < active.len() {
            if active[i].left == 0 {
                for x in active.swap_remove(i).kv {
                    b.free(x);
                }
            } else {
                i += 1;
            }
        }
        b.wait_us(rng.random_range(5_000..15_000));
    }
    for w in weights {
        b.free(w);
    }
    b.events
}

/// `cycles` sawtooth cycles: 32 requests of 1 to 9.5 MiB, every other one
/// freed, then 24 requests of 12 to 17 MiB (none fits a hole left by the
/// first phase), then everything freed. On one contiguous heap the holes
/// are lost to the big requests; with pages unmapped under the holes they
/// are not (`scripts/frag_bounds.py`).
pub fn sawtooth(seed: u64, cycles: u64) -> Vec<Event> {
    const MIB: u64 = 1 << 20;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut b = Builder::new();
    for _ in 0..cycles {
        let small: Vec<(u64, u64)> = (0..32)
            .map(|_| b.alloc(rng.random_range(MIB..=9 * MIB + MIB / 2)))
            .collect();
        let mut kept = Vec::new();
        for (i, x) in small.into_iter().enumerate() {
            if i % 2 == 0 {
                b.free(x);
            } else {
                kept.push(x);
            }
        }
        let big: Vec<(u64, u64)> = (0..24)
            .map(|_| b.alloc(rng.random_range(12 * MIB..=17 * MIB)))
            .collect();
        for x in kept.into_iter().chain(big) {
            b.free(x);
        }
        b.wait_us(rng.random_range(5_000..15_000));
    }
    b.events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balanced(ev: &[Event]) {
        let mut live = rustc_hash::FxHashMap::default();
        for e in ev {
            match e.action {
                Action::Allocate => assert!(live.insert(e.ptr, e.size).is_none()),
                Action::Free => assert_eq!(live.remove(&e.ptr), Some(e.size)),
                Action::AllocateFailure | Action::Synchronize => {}
            }
        }
        assert!(live.is_empty(), "every allocation is freed");
        assert!(ev.windows(2).all(|w| w[0].time_us < w[1].time_us));
    }

    #[test]
    fn generators_are_deterministic_and_balanced() {
        let m = Model {
            layers: 2,
            ..Default::default()
        };
        for (a, b) in [
            (
                random_allocations(1, 500, 1 << 20, 64 << 20),
                random_allocations(1, 500, 1 << 20, 64 << 20),
            ),
            (training(2, 2, m), training(2, 2, m)),
            (kv_cache(3, 4, m), kv_cache(3, 4, m)),
            (sawtooth(4, 3), sawtooth(4, 3)),
        ] {
            assert_eq!(a, b);
            balanced(&a);
        }
        assert_ne!(training(2, 2, m), training(3, 2, m));
    }
}
