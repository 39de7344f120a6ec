//! Control's layers, latch, restart and ramp, over a memory store.

use super::*;
use crate::routing::Source;
use store::{MemoryStore, RampStatus};

fn config(percent: f64) -> Arc<Config> {
    let text = format!(
        "[legacy]\nurl = \"http://127.0.0.1:1\"\n[vastai]\nurl = \"http://127.0.0.1:2\"\n[split]\npercent = {percent}\n[[route]]\nname = \"users\"\npath_prefix = \"/u\"\npercent = 50\n"
    );
    Arc::new(crate::config::parse(&text, ".".into()).expect("valid"))
}

fn upstreams(config: &Config) -> Upstreams {
    Upstreams::build(config, &Default::default()).expect("upstreams")
}

fn control(store: Arc<dyn StateStore>, percent: f64, force: bool) -> Control {
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let config = config(percent);
    Control::new(
        Arc::clone(&config),
        upstreams(&config),
        Arc::new(Health::new(Arc::clone(&metrics))),
        store,
        metrics,
        Startup {
            force_legacy: force,
            replica: None,
        },
    )
}

fn pct(v: f64) -> Percent {
    Percent::try_from(v).expect("valid")
}

#[test]
fn layers_and_rollback_latch() {
    let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
    let c = control(Arc::clone(&store), 10.0, false);
    assert_eq!(c.snapshot().table.percent, pct(10.0));
    c.set_percent(None, pct(30.0), Some("canary".into()))
        .expect("set");
    assert_eq!(
        (c.snapshot().table.percent, c.snapshot().table.source),
        (pct(30.0), Source::Admin)
    );
    let doc = c.rollback(RollbackTrigger::Admin, Some("errors".into()));
    assert!(doc.rolled_back);
    assert_eq!(doc.percent, 0.0);
    assert_eq!(doc.routes[0].percent, 0.0);
    // A reload to 90 % does not undo the rollback.
    let ninety = config(90.0);
    c.apply_file(Arc::clone(&ninety), upstreams(&ninety));
    assert_eq!(c.snapshot().table.percent, Percent::ZERO);
    assert!(c.snapshot().table.rolled_back);
    // A restart restores the latch.
    let again = control(Arc::clone(&store), 90.0, false);
    assert!(again.snapshot().table.rolled_back);
    // DELETE clears it and the file's value applies.
    let doc = again.clear_override(None, None).expect("clear");
    assert!(!doc.rolled_back);
    assert_eq!(doc.percent, 90.0);
    assert_eq!(doc.source, Source::File);
    let log = again.audit_log();
    assert_eq!(log[0].actor, Actor::Admin);
    assert!(log.iter().any(|e| e.change == "rollback"));
}

#[test]
fn unknown_route_and_route_override() {
    let c = control(Arc::new(MemoryStore::default()), 0.0, false);
    assert_eq!(
        c.set_percent(Some("nope"), pct(1.0), None),
        Err(ControlError::UnknownRoute("nope".into()))
    );
    let doc = c
        .set_percent(Some("users"), pct(75.0), None)
        .expect("route");
    assert_eq!(doc.routes[0].percent, 75.0);
    assert_eq!(doc.routes[0].file_percent, 50.0);
    assert_eq!(doc.percent, 0.0);
}

#[test]
fn force_legacy_starts_rolled_back() {
    let c = control(Arc::new(MemoryStore::default()), 100.0, true);
    assert!(c.snapshot().table.rolled_back);
    assert_eq!(c.snapshot().table.percent, Percent::ZERO);
    assert_eq!(c.audit_log()[0].actor, Actor::Startup);
}

#[test]
fn ramp_walks_steps_and_rollback_stops_it() {
    let c = control(Arc::new(MemoryStore::default()), 0.0, false);
    let p = c.ramp_start().expect("start");
    assert_eq!(p.step, 0);
    assert_eq!(
        (c.snapshot().table.percent, c.snapshot().table.source),
        (pct(1.0), Source::Ramp)
    );
    assert!(c.ramp_advance(0).is_some());
    assert_eq!(c.snapshot().table.percent, pct(5.0));
    assert!(c.ramp_advance(0).is_none(), "stale step is refused");
    c.rollback(RollbackTrigger::Guard, Some("error rate".into()));
    assert_eq!(c.ramp().map(|r| r.status), Some(RampStatus::Stopped));
    assert!(c.ramp_advance(1).is_none());
    assert_eq!(c.snapshot().table.source, Source::Guard);
    assert_eq!(c.ramp_action(RampAction::Abort), Ok(None));
}
