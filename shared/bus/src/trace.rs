//! One tracing set-up for every binary, and W3C trace context in NATS headers.
//!
//! Clients inject `traceparent` into every request and publish; the serve
//! loop and event consumers extract it and make it the parent of their span,
//! so one `berth run` is one trace across the CLI and the services.

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber: logs to stderr filtered by `BERTH_LOG`
/// (env-filter syntax, default `info`), and OpenTelemetry span contexts so
/// trace ids propagate. Calling it twice is harmless.
///
/// # Limitations
/// Spans are not exported: `OTEL_EXPORTER_OTLP_ENDPOINT` is not read yet, so
/// traces join across processes (the ids propagate) but are only visible in
/// logs.
pub fn init(service: &str) {
    let filter = EnvFilter::try_from_env("BERTH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let provider = SdkTracerProvider::builder().build();
    let tracer = provider.tracer(service.to_string());
    opentelemetry::global::set_tracer_provider(provider);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .try_init();
}

/// Writes the current span's trace context into `headers`.
pub fn inject(headers: &mut HeaderMap) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// Makes the trace context carried by `headers` the parent of `span`.
pub fn set_parent(span: &tracing::Span, headers: Option<&HeaderMap>) {
    if let Some(headers) = headers {
        let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let _ = span.set_parent(cx);
    }
}

/// The current span's `traceparent` value, or empty when there is none.
pub fn current_traceparent() -> String {
    let mut headers = HeaderMap::new();
    inject(&mut headers);
    headers
        .get("traceparent")
        .map(|value| value.as_str().to_string())
        .unwrap_or_default()
}

/// The trace id of the current span, as 32 hex digits (all zeros when none).
pub fn current_trace_id() -> String {
    use opentelemetry::trace::TraceContextExt;
    let cx = tracing::Span::current().context();
    cx.span().span_context().trace_id().to_string()
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|value| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}
