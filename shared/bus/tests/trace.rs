//! Trace context across the bus: the client's `traceparent` is the parent
//! of the serving span, and with `OTEL_EXPORTER_OTLP_ENDPOINT` set both
//! spans are exported over OTLP/HTTP.
//!
//! `trace::init` installs a process-wide subscriber once, so this file holds
//! one test. The collector is a small HTTP server on loopback that keeps the
//! bodies it is sent.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span as ExportedSpan;
use prost::Message;
use tracing::Instrument;

use berth_bus::{subject, trace, Call, Client, Result, Service};
use berth_testkit::NatsServer;

/// The trace the client's span joins, as a remote caller would send it.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// What the serving side saw of its own span.
#[derive(Clone, PartialEq, prost::Message)]
struct Seen {
    #[prost(string, tag = "1")]
    trace_id: String,
    #[prost(string, tag = "2")]
    traceparent: String,
}

/// `echo` takes nothing.
#[derive(Clone, PartialEq, prost::Message)]
struct Echo {}

async fn echo(_: Arc<()>, _: Call, _: Echo) -> Result<Seen> {
    Ok(Seen {
        trace_id: trace::current_trace_id(),
        traceparent: trace::current_traceparent(),
    })
}

/// The bodies of the exports the collector received.
type Bodies = Arc<Mutex<Vec<Vec<u8>>>>;

/// Accepts OTLP/HTTP exports on loopback and keeps their bodies.
fn collector() -> anyhow::Result<(u16, Bodies)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let kept = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let kept = kept.clone();
            std::thread::spawn(move || serve_exports(stream, &kept));
        }
    });
    Ok((port, bodies))
}

/// Answers each request on one connection with an empty 200.
fn serve_exports(stream: TcpStream, bodies: &Mutex<Vec<Vec<u8>>>) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut length = 0;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        bodies.lock().unwrap().push(body);
        let reply =
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

fn exported_spans(
    bodies: &Mutex<Vec<Vec<u8>>>,
) -> anyhow::Result<(Vec<ExportedSpan>, Vec<String>)> {
    let mut spans = Vec::new();
    let mut services = Vec::new();
    for body in bodies.lock().unwrap().iter() {
        let export = ExportTraceServiceRequest::decode(body.as_slice())?;
        for resource_spans in export.resource_spans {
            for attribute in resource_spans.resource.iter().flat_map(|r| &r.attributes) {
                if attribute.key == "service.name" {
                    if let Some(Value::StringValue(name)) =
                        attribute.value.as_ref().and_then(|v| v.value.clone())
                    {
                        services.push(name);
                    }
                }
            }
            for scope_spans in resource_spans.scope_spans {
                spans.extend(scope_spans.spans);
            }
        }
    }
    Ok((spans, services))
}

/// The span id field of a `traceparent`.
fn span_id_of(traceparent: &str) -> anyhow::Result<String> {
    let parts: Vec<&str> = traceparent.split('-').collect();
    if parts.len() != 4 {
        bail!("not a traceparent: {traceparent:?}");
    }
    Ok(parts[2].to_string())
}

/// The serving span's parent is the client's span, in the client's trace,
/// as seen by the handler and as exported over OTLP.
#[tokio::test]
async fn the_clients_span_is_the_parent_of_the_servers() -> anyhow::Result<()> {
    let (port, bodies) = collector()?;
    std::env::set_var(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        format!("http://127.0.0.1:{port}"),
    );
    trace::init("trace-test");

    let server = NatsServer::start()?;
    let nats = berth_bus::connect(&server.url(), "trace-test").await?;
    let _serving = Service::new("metadata", "0.1.0", Arc::new(()))
        .op("echo", echo)
        .serve(nats.clone())
        .await?;
    nats.flush().await?;
    let client = Client::new(nats, Duration::from_secs(10));
    let subject = subject::op("default", "metadata", "echo")?;

    // The client's span joins a known trace, as if called from outside.
    let span = tracing::info_span!("client.run");
    let mut caller = async_nats::HeaderMap::new();
    caller.insert("traceparent", CALLER);
    trace::set_parent(&span, Some(&caller));
    let (client_traceparent, seen) = async {
        let seen: Seen = client.call(&subject, &Echo {}).await?;
        anyhow::Ok((trace::current_traceparent(), seen))
    }
    .instrument(span)
    .await?;

    // In band: the handler ran in the client's trace, in a span of its own.
    assert_eq!(seen.trace_id, TRACE_ID);
    let client_span_id = span_id_of(&client_traceparent)?;
    let server_span_id = span_id_of(&seen.traceparent)?;
    assert_ne!(server_span_id, client_span_id);

    // Exported: the serving span names the client's span as its parent.
    tokio::task::spawn_blocking(|| trace::shutdown(Duration::from_secs(10))).await?;
    let (spans, services) = exported_spans(&bodies)?;
    assert!(
        services.iter().any(|name| name == "trace-test"),
        "{services:?}"
    );
    let find = |name: &str| {
        spans
            .iter()
            .find(|span| span.name == name)
            .with_context(|| format!("span {name} not exported: {spans:?}"))
    };
    let client_span = find("client.run")?;
    let server_span = find("metadata.echo")?;
    assert_eq!(hex::encode(&client_span.trace_id), TRACE_ID);
    assert_eq!(hex::encode(&server_span.trace_id), TRACE_ID);
    assert_eq!(hex::encode(&client_span.span_id), client_span_id);
    assert_eq!(hex::encode(&server_span.span_id), server_span_id);
    assert_eq!(server_span.parent_span_id, client_span.span_id);
    assert_eq!(hex::encode(&client_span.parent_span_id), "00f067aa0ba902b7");
    Ok(())
}
