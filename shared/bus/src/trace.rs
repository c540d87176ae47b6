//! One tracing set-up for every binary, and W3C trace context in NATS headers.
//!
//! Clients inject `traceparent` into every request and publish; the serve
//! loop and event consumers extract it and make it the parent of their span,
//! so one `berth run` is one trace across the CLI and the services. When
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//! set, spans are also exported over OTLP/HTTP with protobuf bodies.

use std::sync::OnceLock;
use std::time::Duration;

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The variables that turn OTLP export on, most specific first.
pub const OTLP_ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// The provider `init` installed, kept so `shutdown` can flush it.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Installs the global subscriber: logs to stderr filtered by `BERTH_LOG`
/// (env-filter syntax, default `info`), and OpenTelemetry span contexts so
/// trace ids propagate. With an OTLP endpoint set (see
/// [`OTLP_ENDPOINT_VARS`]; the standard `OTEL_EXPORTER_OTLP_*` variables
/// for headers and timeout apply too), spans are exported in batches, named
/// by `service` as `service.name`. Only the first call in a process acts.
///
/// # Limitations
/// The exporter speaks OTLP over plain HTTP (`http://…`, port 4318 by
/// convention), without TLS or gRPC: a remote or TLS-only collector is
/// reached through a local one that forwards. An exporter that cannot be built
/// (a malformed endpoint) is reported on stderr and spans are not exported.
/// Spans still in the batch when the process ends are lost unless it calls
/// [`shutdown`].
pub fn init(service: &str) {
    init_with(service, "info");
}

/// As [`init`], with `default_filter` for the logs when `BERTH_LOG` is not
/// set (the CLI prints only warnings). Spans at info level and above get
/// trace contexts whatever the log filter says, so a quiet client still
/// sends `traceparent`.
pub fn init_with(service: &str, default_filter: &str) {
    PROVIDER.get_or_init(|| install(service, default_filter));
}

fn install(service: &str, default_filter: &str) -> SdkTracerProvider {
    use tracing_subscriber::Layer as _;
    let filter =
        EnvFilter::try_from_env("BERTH_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let mut builder = SdkTracerProvider::builder().with_resource(
        Resource::builder()
            .with_service_name(service.to_string())
            .build(),
    );

    // Export only when asked: without an endpoint the provider still makes
    // span contexts, which is all that propagation needs.
    let export = OTLP_ENDPOINT_VARS
        .iter()
        .any(|var| std::env::var(var).is_ok_and(|value| !value.trim().is_empty()));
    let mut refused = None;
    if export {
        crate::crypto::install();
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => builder = builder.with_batch_exporter(exporter),
            Err(err) => refused = Some(err),
        }
    }

    let provider = builder.build();
    let tracer = provider.tracer(service.to_string());
    opentelemetry::global::set_tracer_provider(provider.clone());
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colours only for a person at a terminal, not in log files.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter(filter),
        )
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
        )
        .try_init();
    if let Some(err) = refused {
        tracing::error!(error = %err, "otlp exporter not built; spans are not exported");
    }
    provider
}

/// Exports the spans still batched and stops exporting, waiting at most
/// `timeout`; binaries call it before they exit. A no-op before [`init`].
pub fn shutdown(timeout: Duration) {
    let Some(provider) = PROVIDER.get() else {
        return;
    };
    // The exporter's blocking HTTP client may not run on an async worker,
    // and callers are often on one: the flush gets a thread of its own.
    let provider = provider.clone();
    let flushed = std::thread::spawn(move || provider.shutdown_with_timeout(timeout)).join();
    match flushed {
        Ok(Err(err)) => tracing::warn!(error = %err, "spans not flushed at shutdown"),
        Err(_) => tracing::warn!("span flush panicked at shutdown"),
        Ok(Ok(())) => {}
    }
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
