//! Call sites of sampled allocations: capture a few return addresses with the
//! `backtrace` crate, intern them, and resolve them to text only when a report
//! asks.
//!
//! Capture costs microseconds, so it is sampled (`backtrace_sample:K`: one
//! allocation in K per thread, the first one included) and runs after the
//! engine has handed out the block, outside every arena lock. Symbol
//! resolution reads debug info and never touches the device, so it is safe at
//! process exit.

use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use std::cell::Cell;
use std::sync::Arc;

/// Frames captured beyond the configured count, so that cudalloc's own frames
/// (trimmed at resolution) do not eat into the caller's.
const SLACK: usize = 16;

/// Which allocations get a call site.
#[derive(Debug, Clone, Copy)]
pub struct Sampler {
    pub frames: usize,
    pub every: u32,
}

thread_local! {
    static COUNTDOWN: Cell<u32> = const { Cell::new(0) };
}

impl Sampler {
    /// Whether this thread's current allocation is sampled: the first, then
    /// one in `every`. Thread-local, so threads share nothing.
    #[inline]
    pub fn hit(&self) -> bool {
        COUNTDOWN
            .try_with(|c| {
                let n = c.get();
                if n <= 1 {
                    c.set(self.every);
                    true
                } else {
                    c.set(n - 1);
                    false
                }
            })
            .unwrap_or(false)
    }

    /// Capture the caller's stack and intern it. Returns the site id (never 0).
    #[inline(never)]
    pub fn capture(&self) -> u32 {
        let mut ips: Vec<usize> = Vec::with_capacity(self.frames + SLACK);
        backtrace::trace(|f| {
            ips.push(f.ip() as usize);
            ips.len() < self.frames + SLACK
        });
        intern(ips.into_boxed_slice(), self.frames)
    }
}

struct Site {
    ips: Box<[usize]>,
    frames: usize,
    text: Option<Arc<Vec<String>>>,
}

#[derive(Default)]
struct Sites {
    ids: FxHashMap<Box<[usize]>, u32>,
    sites: Vec<Site>,
}

static SITES: Mutex<Option<Sites>> = Mutex::new(None);

fn intern(ips: Box<[usize]>, frames: usize) -> u32 {
    let mut g = SITES.lock();
    let s = g.get_or_insert_with(Sites::default);
    if let Some(&id) = s.ids.get(&ips) {
        return id;
    }
    s.sites.push(Site {
        ips: ips.clone(),
        frames,
        text: None,
    });
    let id = s.sites.len() as u32;
    s.ids.insert(ips, id);
    id
}

/// Entry points of cudalloc: the caller's frames start after the outermost
/// of these. Without one (stripped symbols), leading frames that are
/// obviously cudalloc's or the unwinder's are trimmed instead.
fn entry(name: &str) -> bool {
    name == "cudalloc_malloc"
        || name == "cudalloc::ffi::cudalloc_malloc"
        || name == "cudalloc::allocator::Allocator::malloc"
        || name == "cudalloc::engine::Engine::malloc"
}

fn internal(name: &str) -> bool {
    ["backtrace::", "cudalloc::", "<cudalloc::", "cudalloc_"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// The frames of site `id` as text (`function (file:line)`), cudalloc's own
/// frames trimmed. Empty for 0 or an unknown id. Resolved once, then cached.
pub fn describe(id: u32) -> Arc<Vec<String>> {
    if id == 0 {
        return Arc::default();
    }
    let (ips, frames) = {
        let g = SITES.lock();
        let Some(site) = g.as_ref().and_then(|s| s.sites.get(id as usize - 1)) else {
            return Arc::default();
        };
        if let Some(t) = &site.text {
            return t.clone();
        }
        (site.ips.clone(), site.frames)
    };
    // Resolve without the lock: it can take milliseconds.
    let mut all: Vec<(String, String)> = Vec::new();
    for &ip in ips.iter() {
        let mut names = Vec::new();
        backtrace::resolve(ip as *mut std::ffi::c_void, |sym| {
            let name = sym
                .name()
                .map(|n| format!("{n:#}"))
                .unwrap_or_else(|| format!("{ip:#x}"));
            let place = match (sym.filename(), sym.lineno()) {
                (Some(f), Some(l)) => format!(" ({}:{l})", f.display()),
                _ => String::new(),
            };
            names.push((name, place));
        });
        if names.is_empty() {
            names.push((format!("{ip:#x}"), String::new()));
        }
        all.extend(names);
    }
    let start = match all.iter().rposition(|(n, _)| entry(n)) {
        Some(i) => i + 1,
        None => all.iter().take_while(|(n, _)| internal(n)).count(),
    };
    let lines: Vec<String> = all[start..]
        .iter()
        .take(frames)
        .map(|(n, p)| format!("{n}{p}"))
        .collect();
    let text = Arc::new(lines);
    if let Some(s) = SITES.lock().as_mut() {
        if let Some(site) = s.sites.get_mut(id as usize - 1) {
            site.text = Some(text.clone());
        }
    }
    text
}
