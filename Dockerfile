# stompgate: release build, then a slim runtime image running as non-root.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY config config
COPY static static
COPY bench bench
RUN cargo build --release --locked --bin stompgate

FROM debian:bookworm-slim
# curl is only for the container healthcheck (GET /readyz).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin stompgate
COPY --from=build /src/target/release/stompgate /usr/local/bin/stompgate
USER stompgate
ENV STOMPGATE__SERVER__LISTEN=0.0.0.0:8080 \
    RUST_LOG=info
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s \
  CMD curl -fsS http://127.0.0.1:8080/readyz || exit 1
ENTRYPOINT ["/usr/local/bin/stompgate"]
