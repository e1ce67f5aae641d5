//! Fault injection on the sim device, checked against the reference model in
//! `support` after every step (stats exact, every live allocation intact,
//! invariants, stream safety):
//! - the Nth driver allocation fails, for every N of a scripted workload, once
//!   and then again every N allocations;
//! - event calls fail for stretches of the run;
//! - device capacity shrinks mid-run (another process takes memory) and
//!   comes back.

#[allow(dead_code)] // this binary uses part of the shared tree (tests/support/mod.rs)
mod support;

use support::model::Harness;
use support::ops::{Mix, Op};

const CONF: &str = "sim_devices:2,sim_memory:256MiB";

/// The scripted workload: a fixed op sequence (the model's generator, seed 7).
fn script(len: usize) -> Vec<[u64; 3]> {
    let mut rng = Mix(7);
    (0..len).map(|_| rng.words()).collect()
}

fn run(h: &mut Harness, words: &[[u64; 3]], mut between: impl FnMut(&mut Harness, usize)) {
    for (i, &w) in words.iter().enumerate() {
        between(h, i);
        let op = Op::decode(w, h.ndev());
        if let Err(e) = h.step(op).and_then(|_| h.check(true)) {
            panic!("op {i} {op:?}: {e}");
        }
        assert!(h.violations.is_empty(), "{:?}", h.violations);
    }
    h.drain().unwrap();
    assert!(h.violations.is_empty(), "{:?}", h.violations);
}

/// How many driver allocations the script makes with no fault.
fn clean_driver_allocs(words: &[[u64; 3]], manual: bool) -> u64 {
    let mut h = Harness::new(CONF, manual);
    run(&mut h, words, |_, _| {});
    (0..h.ndev()).map(|d| h.spy.device(d).driver_allocs).sum()
}

#[test]
fn nth_driver_allocation_fails_at_every_n() {
    let words = script(400);
    for manual in [false, true] {
        let total = clean_driver_allocs(&words, manual);
        assert!(
            total >= 20,
            "the script must reach the driver often ({total})"
        );
        for n in 1..=total {
            let mut h = Harness::new(CONF, manual);
            h.spy.sim.fail_alloc_at(n);
            // One failure within a call is absorbed by the OOM ladder's
            // retry: the model's "no OOM with room to spare" check holds.
            run(&mut h, &words, |_, _| {});
            assert!(
                h.spy.sim.counters().mem_alloc_failures >= 1,
                "fault {n} of {total} never fired"
            );
        }
    }
}

#[test]
fn every_nth_driver_allocation_fails() {
    let words = script(400);
    for n in [1, 2, 3, 5, 8] {
        // Re-armed between calls, so each call meets at most one failure,
        // which the ladder's retry absorbs.
        let mut h = Harness::new(CONF, true);
        h.spy.sim.fail_nth_alloc_from_now(n);
        let mut fired = 0;
        run(&mut h, &words, |h, _| {
            let f = h.spy.sim.counters().mem_alloc_failures;
            if f > fired {
                fired = f;
                h.spy.sim.fail_nth_alloc_from_now(n);
            }
        });
        assert!(fired >= 5, "every {n}th: only {fired} faults fired");
    }
}

fn events_fail_for_stretches(with_record_stream: bool) {
    let words: Vec<[u64; 3]> = script(3000)
        .into_iter()
        .filter(|&w| {
            with_record_stream
                || !matches!(
                    Op::decode(w, 2),
                    Op::RecordStream { .. } | Op::RecordUnknown { .. }
                )
        })
        .collect();
    for manual in [true, false] {
        let mut h = Harness::new(CONF, manual);
        let mut failing = 0;
        run(&mut h, &words, |h, i| {
            // Off for 150 ops, on for 50, repeatedly.
            let fail = i % 200 >= 150;
            h.spy.sim.set_fail_events(fail);
            failing += fail as u32;
        });
        assert!(failing > 0);
    }
}

/// Event failures block adoption and the non-blocking release; the cache
/// still serves its own stream and `empty_cache` still synchronises.
#[test]
fn event_calls_fail_for_stretches() {
    events_fail_for_stretches(false);
}

#[test]
fn event_calls_fail_for_stretches_with_record_stream() {
    events_fail_for_stretches(true);
}

#[test]
fn capacity_shrinks_mid_run_and_comes_back() {
    let words = script(3000);
    let mut h = Harness::new(CONF, true);
    let mut rng = Mix(99);
    let mut ooms_while_small = 0;
    run(&mut h, &words, |h, i| {
        // Not before the first stats call: the engine reads the device's
        // total once, and memory_fraction is a fraction of that.
        if i % 100 == 0 && i > 0 {
            let d = (rng.next() % 2) as usize;
            // Another process takes 0-90% of the device, or gives it back.
            let cap = (256u64 << 20) / 10 * (1 + rng.next() % 10);
            h.set_capacity(d, cap);
        }
        if i % 100 == 99 {
            ooms_while_small = (0..2)
                .map(|d| h.alloc.stats(d).unwrap().num_ooms)
                .sum::<u64>();
        }
    });
    assert!(ooms_while_small > 0, "the shrinking never bit");
}

/// A block freed after `record_stream(p, B)` waits for an event on B. If the
/// event query then fails (a transient driver error, not deinitialisation),
/// the engine must keep waiting or synchronise B; it must not hand the block
/// out again as if B's work were done.
#[test]
fn failing_event_query_does_not_release_a_recorded_block() {
    let mut h = Harness::new("sim_memory:1GiB", true);
    h.step(Op::Malloc {
        dev: 0,
        stream: 0x10,
        size: 4096,
    })
    .unwrap();
    let p = *h.live.keys().next().unwrap();
    h.step(Op::RecordStream {
        pick: 0,
        stream: 0x20,
    })
    .unwrap();
    h.step(Op::Free {
        pick: 0,
        hint_dev: 0,
        hint_stream: 0x10,
    })
    .unwrap();
    h.spy.sim.set_fail_events(true);
    h.step(Op::Malloc {
        dev: 0,
        stream: 0x10,
        size: 4096,
    })
    .unwrap();
    let q = *h.live.keys().next().unwrap();
    assert!(
        h.violations.is_empty(),
        "p={p:#x} q={q:#x}: {:?}",
        h.violations
    );
}
