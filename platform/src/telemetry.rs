//! Logging: structured JSON lines by default (one object per event, with the span fields
//! such as `request_id`), or a human format for local work. With
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set (e.g. `http://collector:4318`), spans are also exported
//! to an OpenTelemetry collector (OTLP over HTTP, protobuf), and a request's W3C
//! `traceparent` becomes the parent of its span.

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for machines.
    Json,
    /// Human-readable lines, for a terminal.
    Pretty,
}

/// Keeps the span exporter alive; dropping it flushes what is buffered.
#[derive(Debug, Default)]
#[must_use = "dropping the guard stops the span export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(err) = provider.shutdown() {
                tracing::warn!(error = %err, "span export did not flush");
            }
        }
    }
}

/// Installs the global subscriber for `service`. The filter comes from `RUST_LOG` (default
/// `info`). Calling it twice is harmless (the second call does nothing), which tests rely
/// on. Spans go to OpenTelemetry when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (service name
/// `OTEL_SERVICE_NAME`, else `service`).
pub fn init(format: LogFormat, service: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (otel, provider, otel_error) = match otel_provider(service) {
        Ok(Some(provider)) => {
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(service.to_owned()))
                .boxed();
            (Some(layer), Some(provider), None)
        }
        Ok(None) => (None, None, None),
        Err(err) => (None, None, Some(err)),
    };
    let fmt = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    if let Some(err) = otel_error {
        tracing::warn!(error = %err, "OpenTelemetry export is off: the exporter could not be built");
    } else if provider.is_some() {
        tracing::info!("exporting spans to the OpenTelemetry collector");
    }
    Telemetry { provider }
}

fn otel_provider(service: &str) -> Result<Option<SdkTracerProvider>, String> {
    let configured = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|var| std::env::var(var).is_ok_and(|v| !v.trim().is_empty()));
    if !configured {
        return Ok(None);
    }
    // The endpoint, headers and timeouts come from the standard OTEL_* variables.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|err| err.to_string())?;
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(name)
                .build(),
        )
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    Ok(Some(provider))
}

/// Makes the request's `traceparent` (if any) the parent of `span` in the exported trace.
pub fn continue_trace(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    });
    // Without the OpenTelemetry layer (export off) there is nothing to link.
    let _ = span.set_parent(parent);
}

struct HeaderExtractor<'a>(&'a axum::http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}
