//! The ADS service on the gRPC port, with a codec that bounds what each stream keeps.
//!
//! tonic gives every stream one receive buffer and reclaims it for the next message, so it stays
//! as large as the largest message the stream ever carried: an Envoy's first EDS subscription
//! names every cluster (~150 KiB for 5,000), and a thousand Envoys kept ~150 MiB of buffers
//! after their initial sync. The decoder here holds on to the last message's bytes until the
//! next one is decoded; the buffer is then shared when tonic needs room, so tonic starts a fresh
//! small one and the large one is freed with the message. Answers are encoded one message at a
//! time, so the send buffer is no larger than one (split) answer.
//!
//! tonic sizes the buffer for a message when it reads its length, adding room for what of it
//! already arrived: up to an HTTP/2 frame (16 KiB) more than needed. Later small requests (ACKs)
//! land in that room and keep the large buffer alive; handing tonic the body in 1 KiB pieces
//! bounds the room to 1 KiB, which the ACKs of the initial sync fill, and the buffer is freed.

use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use prost::Message;
use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
use tonic::codec::{BufferSettings, DecodeBuf, EncodeBuf};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Status, Streaming};

use super::ads::{self, Ads};

/// Initial (and smallest) buffer per stream and direction: xDS requests after the first are
/// ACKs of a few hundred bytes.
const BUFFER: usize = 4 << 10;

pub struct Codec<E, D>(PhantomData<fn(E) -> D>);

impl<E, D> Default for Codec<E, D> {
    fn default() -> Self {
        Codec(PhantomData)
    }
}

/// A request as read off the wire.
pub trait Read: Sized + Send {
    fn read(message: Bytes) -> Result<Self, Status>;
}

fn invalid(e: prost::DecodeError) -> Status {
    Status::invalid_argument(e.to_string())
}

impl Read for DeltaDiscoveryRequest {
    fn read(message: Bytes) -> Result<Self, Status> {
        Self::decode(message).map_err(invalid)
    }
}

/// `DiscoveryRequest` without its resource names.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SotwHead {
    #[prost(string, tag = "1")]
    pub version_info: String,
    #[prost(message, optional, tag = "2")]
    pub node: Option<envoy_types::pb::envoy::config::core::v3::Node>,
    #[prost(string, tag = "4")]
    pub type_url: String,
    #[prost(string, tag = "5")]
    pub response_nonce: String,
    #[prost(message, optional, tag = "6")]
    pub error_detail: Option<envoy_types::pb::google::rpc::Status>,
}

/// A State-of-the-World request. Every ACK repeats all the names the client watches (5,000 in a
/// 5,000-service mesh) and a thousand clients ACK every change: the names are read as a digest
/// (the one [`super::ads::hash_names`] makes) and only decoded when it changed.
pub struct SotwRequest {
    pub head: SotwHead,
    pub names_digest: u64,
    message: Bytes,
}

impl SotwRequest {
    pub fn names(&self) -> Result<Vec<String>, Status> {
        DiscoveryRequest::decode(self.message.clone())
            .map(|r| r.resource_names)
            .map_err(invalid)
    }
}

impl Read for SotwRequest {
    fn read(message: Bytes) -> Result<Self, Status> {
        use std::hash::Hasher;
        // The head skips field 3; the digest reads only field 3, in place.
        let head = SotwHead::decode(message.clone()).map_err(invalid)?;
        let mut h = super::ads::names_hasher();
        let mut rest = &message[..];
        while !rest.is_empty() {
            let (tag, wire_type) = decode_key(&mut rest).map_err(invalid)?;
            if tag == 3 && wire_type == WireType::LengthDelimited {
                let len = decode_varint(&mut rest).map_err(invalid)? as usize;
                let name = rest
                    .get(..len)
                    .ok_or_else(|| Status::invalid_argument("truncated resource name"))?;
                super::ads::hash_name(&mut h, name);
                rest = &rest[len..];
            } else {
                skip_field(wire_type, tag, &mut rest, DecodeContext::default()).map_err(invalid)?;
            }
        }
        Ok(SotwRequest {
            head,
            names_digest: h.finish(),
            message,
        })
    }
}

impl<E: Message + 'static, D: Read + 'static> tonic::codec::Codec for Codec<E, D> {
    type Encode = E;
    type Decode = D;
    type Encoder = Encoder<E>;
    type Decoder = Decoder<D>;

    fn encoder(&mut self) -> Encoder<E> {
        Encoder(PhantomData)
    }

    fn decoder(&mut self) -> Decoder<D> {
        Decoder {
            last: None,
            _type: PhantomData,
        }
    }
}

pub struct Encoder<E>(PhantomData<fn(E)>);

impl<E: Message> tonic::codec::Encoder for Encoder<E> {
    type Item = E;
    type Error = Status;

    fn encode(&mut self, item: E, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf).map_err(|e| Status::internal(e.to_string()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        // A yield threshold of one byte: every answer goes out on its own.
        BufferSettings::new(BUFFER, 1)
    }
}

pub struct Decoder<D> {
    /// The previous message: keeps its buffer shared so tonic does not reclaim it (see above).
    last: Option<Bytes>,
    _type: PhantomData<fn() -> D>,
}

impl<D: Read> tonic::codec::Decoder for Decoder<D> {
    type Item = D;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        // Splits the message off tonic's buffer without copying; a SotW request keeps it to
        // decode its names from should they have changed.
        let message = buf.copy_to_bytes(buf.remaining());
        let item = D::read(message.clone())?;
        self.last = Some(message);
        Ok(Some(item))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(BUFFER, 1)
    }
}

/// Most bytes handed to tonic at once (see the module comment).
const PIECE: usize = 1 << 10;

/// A request body whose data frames are cut into pieces of at most [`PIECE`] bytes (no copies).
struct Pieces<B> {
    inner: std::pin::Pin<Box<B>>,
    rest: Bytes,
}

impl<B: http_body::Body> http_body::Body for Pieces<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        if self.rest.is_empty() {
            match std::task::ready!(self.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(mut data) => self.rest = data.copy_to_bytes(data.remaining()),
                    Err(other) => return Poll::Ready(Some(Ok(other.map_data(|mut d| d.copy_to_bytes(d.remaining()))))),
                },
                other => {
                    return Poll::Ready(other.map(|r| r.map(|f| f.map_data(|mut d| d.copy_to_bytes(d.remaining())))));
                }
            }
        }
        let n = self.rest.len().min(PIECE);
        Poll::Ready(Some(Ok(http_body::Frame::data(self.rest.split_to(n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }
}

/// A response body that keeps the last frame it passed on until tonic has made the next one:
/// tonic then encodes into a fresh buffer instead of reclaiming the previous one, which may be
/// as large as an initial sync's answer, so a stream keeps no more than its last answer.
struct HoldLast {
    inner: tonic::body::Body,
    last: Option<Bytes>,
}

impl http_body::Body for HoldLast {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let frame = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(http_body::Frame::data_ref)) {
            self.last = data.cloned();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

const SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";

/// `envoy.service.discovery.v3.AggregatedDiscoveryService`: State of the World and delta.
#[derive(Clone)]
pub struct AdsServer {
    ads: Arc<Ads>,
    max_message: usize,
}

impl AdsServer {
    pub fn new(ads: Arc<Ads>, max_message: usize) -> Self {
        AdsServer { ads, max_message }
    }
}

impl NamedService for AdsServer {
    const NAME: &'static str = SERVICE;
}

use crate::publish::Scope;
use crate::subscribe::bearer;

struct Sotw(Arc<Ads>);
struct Delta(Arc<Ads>);

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<tonic::Response<T>, Status>> + Send>>;

impl StreamingService<SotwRequest> for Sotw {
    type Response = envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    type ResponseStream = ads::SotwResponses;
    type Future = BoxFuture<ads::SotwResponses>;

    fn call(&mut self, req: Request<Streaming<SotwRequest>>) -> Self::Future {
        let ads = self.0.clone();
        Box::pin(async move {
            ads.access.check(&Scope::All, bearer(req.metadata())).await?;
            Ok(ads::stream_sotw(ads, req))
        })
    }
}

impl StreamingService<DeltaDiscoveryRequest> for Delta {
    type Response = envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse;
    type ResponseStream = ads::DeltaResponses;
    type Future = BoxFuture<ads::DeltaResponses>;

    fn call(&mut self, req: Request<Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        let ads = self.0.clone();
        Box::pin(async move {
            ads.access.check(&Scope::All, bearer(req.metadata())).await?;
            Ok(ads::stream_delta(ads, req))
        })
    }
}

impl<B> tower_service::Service<http::Request<B>> for AdsServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (ads, max) = (self.ads.clone(), Some(self.max_message));
        let req = req.map(|body| Pieces {
            inner: Box::pin(body),
            rest: Bytes::new(),
        });
        let method = req.uri().path().strip_prefix('/').and_then(|p| p.strip_prefix(SERVICE));
        let method = method.unwrap_or_default().to_string();
        Box::pin(async move {
            let res = match method.as_str() {
                "/StreamAggregatedResources" => {
                    Grpc::new(Codec::default())
                        .apply_max_message_size_config(max, None)
                        .streaming(Sotw(ads), req)
                        .await
                }
                "/DeltaAggregatedResources" => {
                    Grpc::new(Codec::default())
                        .apply_max_message_size_config(max, None)
                        .streaming(Delta(ads), req)
                        .await
                }
                _ => return Ok(Status::unimplemented(format!("{SERVICE}{method}")).into_http()),
            };
            Ok(res.map(|inner| tonic::body::Body::new(HoldLast { inner, last: None })))
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, BytesMut};
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use prost::Message;

    use super::{Read, SotwRequest};
    use crate::xds::ads::hash_names;

    /// An ACK is read as its head and a digest of its names; the names decode only on demand, and
    /// the digest is the one subscriptions are interned by.
    #[test]
    fn a_sotw_ack_is_read_as_its_head_and_a_digest_of_its_names() {
        let names: Vec<String> = (0..3).map(|i| format!("service/default/svc-{i}:80")).collect();
        let ack = |names: Vec<String>| DiscoveryRequest {
            version_info: "7".into(),
            resource_names: names,
            type_url: ferrum_proto::xds::ENDPOINT.into(),
            response_nonce: "12".into(),
            ..Default::default()
        };
        let r = SotwRequest::read(ack(names.clone()).encode_to_vec().into()).unwrap();
        assert_eq!(
            (
                r.head.version_info.as_str(),
                r.head.response_nonce.as_str(),
                r.head.type_url.as_str()
            ),
            ("7", "12", ferrum_proto::xds::ENDPOINT)
        );
        assert_eq!(r.names_digest, hash_names(&names));
        assert_eq!(r.names().unwrap(), names);
        let fewer = SotwRequest::read(ack(names[..2].to_vec()).encode_to_vec().into()).unwrap();
        assert_ne!(fewer.names_digest, r.names_digest);
        // A name cut short is an error, not a shorter name.
        let only_names = DiscoveryRequest {
            resource_names: names.clone(),
            ..Default::default()
        };
        let mut bytes = only_names.encode_to_vec();
        bytes.truncate(bytes.len() - 3);
        assert!(SotwRequest::read(bytes.into()).is_err());
    }

    /// What the decoder relies on: while a message split off the receive buffer is alive, making
    /// room allocates a new buffer of the initial size instead of keeping the large one.
    #[test]
    fn a_held_message_lets_the_receive_buffer_start_small_again() {
        let mut buf = BytesMut::with_capacity(super::BUFFER);
        buf.put_slice(&[1; 150 << 10]);
        let big = buf.split_to(150 << 10).freeze();
        buf.put_slice(&[2; 100]);
        assert!(buf.capacity() <= super::BUFFER, "capacity {}", buf.capacity());
        drop(big);
        // Without the hold the large buffer is reclaimed: the memory tonic would keep per stream.
        let mut buf = BytesMut::with_capacity(super::BUFFER);
        buf.put_slice(&[1; 150 << 10]);
        drop(buf.split_to(150 << 10).freeze());
        buf.put_slice(&[2; 100]);
        assert!(buf.capacity() >= 150 << 10, "capacity {}", buf.capacity());
    }
}
