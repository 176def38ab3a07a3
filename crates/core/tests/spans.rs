//! Core keeps each live actor's current span for the lines its user code logs: the `actor`
//! span from its start on, the `action` span inside it while an action runs, and nothing once
//! it stopped.

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use axum::body::Body;
use keel_core::spans::ActorSpans;
use keel_core::{
    ActionCall, ActionDone, ActorInfo, ActorType, Effects, Host, Payload, Registry, Result,
    RuntimeConfig, StartRequest, StopReason,
};
use parking_lot::Mutex;

/// What the host saw core report, call by call: `call:actor_span/call_span`.
#[derive(Default)]
struct SpyHost {
    spans: OnceLock<Arc<ActorSpans>>,
    seen: Mutex<Vec<String>>,
}

impl SpyHost {
    fn record(&self, call: &str, actor: &ActorInfo) {
        let spans = self.spans.get().expect("the registry's spans are set");
        let line = match spans.current(&actor.id) {
            Some(current) => format!(
                "{call}:{}/{}",
                current.actor.metadata().map_or("-", |m| m.name()),
                current
                    .call
                    .as_ref()
                    .and_then(|span| span.metadata())
                    .map_or("-", |m| m.name()),
            ),
            None => format!("{call}:none"),
        };
        self.seen.lock().push(line);
    }
}

#[async_trait]
impl Host for SpyHost {
    async fn start(&self, actor: &Arc<ActorInfo>, _request: StartRequest) -> Result<Effects> {
        self.record("start", actor);
        Ok(Effects {
            state: Some(b"{}".to_vec()),
            ..Effects::default()
        })
    }

    async fn action(&self, actor: &Arc<ActorInfo>, _call: ActionCall) -> Result<ActionDone> {
        self.record("action", actor);
        Ok(ActionDone {
            output: Payload::json("null"),
            effects: Effects::default(),
        })
    }

    async fn stop(&self, actor: &Arc<ActorInfo>, _reason: StopReason) -> Result<Effects> {
        self.record("stop", actor);
        Ok(Effects::default())
    }

    fn state_encoding(&self) -> keel_core::Encoding {
        keel_core::Encoding::Json
    }
}

#[tokio::test]
async fn a_live_actor_logs_in_its_current_span_and_a_stopped_one_in_none() {
    // A subscriber, so spans are real; on this thread, which runs every task of this test.
    let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry());
    let dir = tempfile::tempdir().unwrap();
    let host = Arc::new(SpyHost::default());
    let registry = Registry::new(host.clone());
    host.spans.set(registry.actor_spans().clone()).ok().unwrap();
    registry.register(ActorType::new("spy", ["run"])).unwrap();
    let config = RuntimeConfig {
        data_dir: dir.path().to_path_buf(),
        ..RuntimeConfig::default()
    };
    let request = axum::http::Request::post("/v1/actors/spy/actions/run")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"key":["a"]}"#))
        .unwrap();
    let response = registry.handle(&config, request).await.unwrap();
    assert_eq!(response.status(), 200);

    let runtime = registry.runtime().unwrap();
    let actor = runtime
        .resolve(keel_core::Target::Key {
            name: "spy".into(),
            key: vec!["a".into()],
            mode: keel_core::Resolve::Get,
            input: None,
        })
        .await
        .unwrap();
    let between = registry
        .actor_spans()
        .current(&actor.id)
        .expect("the actor is live");
    assert_eq!(between.actor.metadata().unwrap().name(), "actor");
    assert!(between.call.is_none(), "no action runs between calls");

    registry.shutdown().await;
    assert_eq!(
        *host.seen.lock(),
        ["start:actor/-", "action:actor/action", "stop:actor/-"],
    );
    assert!(registry.actor_spans().current(&actor.id).is_none());
    assert!(
        registry.actor_spans().is_empty(),
        "a stopped actor is forgotten"
    );
}
