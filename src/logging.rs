//! Log output: one JSON object per line (default) or human-readable text, filtered by `--log`.
//! The JSON writer is the crate's own response writer, so logging pulls in no serializer.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;
use crate::ids::Micros;
use crate::json::Obj;

/// Install the global subscriber. `filter` is a level or `target=level,...`.
pub fn init(format: LogFormat, filter: &str) -> Result<(), String> {
    let targets: Targets = filter
        .parse()
        .map_err(|e| format!("--log {filter:?}: {e}"))?;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let result = match format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(JsonLines)
                    .with_writer(std::io::stdout),
            )
            .with(targets)
            .try_init(),
        LogFormat::Text => tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stdout))
            .with(targets)
            .try_init(),
    };
    result.map_err(|e| e.to_string())
}

/// `{"ts":"…","level":"INFO","target":"…","message":"…",<fields>}`.
pub struct JsonLines;

struct Fields<'a, 'b>(&'a mut Obj<'b>);

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.str(field.name(), value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.int(field.name(), value);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        match i64::try_from(value) {
            Ok(v) => self.0.int(field.name(), v),
            Err(_) => self.0.str(field.name(), &value.to_string()),
        };
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.bool(field.name(), value);
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.str(field.name(), &format!("{value:?}"));
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut out = Vec::with_capacity(256);
        let mut o = Obj::new(&mut out);
        o.time("ts", Micros::now())
            .str("level", meta.level().as_str())
            .str("target", meta.target());
        event.record(&mut Fields(&mut o));
        o.finish();
        writeln!(writer, "{}", String::from_utf8_lossy(&out))
    }
}

thread_local! {
    /// The route of the request this thread is working on, for the panic log.
    static ROUTE: std::cell::Cell<&'static str> = const { std::cell::Cell::new("") };
}

/// A future that marks its thread as working on `route` whenever it runs, so a panic inside it
/// is logged with the route (on an ingress core many requests interleave: the mark is set on every
/// poll and taken off after it).
pub struct InRoute<F> {
    route: &'static str,
    inner: std::pin::Pin<Box<F>>,
}

/// Run `fut` marked with `route` (see [`InRoute`]).
pub fn in_route<F: std::future::Future>(route: &'static str, fut: F) -> InRoute<F> {
    InRoute {
        route,
        inner: Box::pin(fut),
    }
}

impl<F: std::future::Future> std::future::Future for InRoute<F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let before = ROUTE.with(|r| r.replace(self.route));
        let polled = self.inner.as_mut().poll(cx);
        ROUTE.with(|r| r.set(before));
        polled
    }
}

/// Log every panic through `tracing` (thread, ingress core, route, message, location) before the
/// default hook runs. Release builds abort on panic (`panic = "abort"`): the process exits and its
/// supervisor (systemd, Docker, Fly) starts it again, so no half-alive server keeps running.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let core = name
            .strip_prefix("ingress-")
            .and_then(|n| n.parse::<i64>().ok())
            .unwrap_or(-1);
        let route = ROUTE.with(|r| r.get());
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(
            thread = name,
            core,
            route,
            location,
            message,
            "panic: the process stops; its supervisor restarts it"
        );
        default(info);
    }));
}
