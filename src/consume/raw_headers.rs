//! A consumed message's headers with their names as bytes.
//!
//! rdkafka's `Headers::try_get` unwraps each header's name as UTF-8, and librdkafka does not
//! check names: a producer that wrote a name that is not UTF-8 would make every read of that
//! message's headers panic, and the consumer would crash on it again after every restart.
//! This module reads the names through librdkafka's C API instead, as bytes.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::ptr;

use rdkafka::bindings as rdsys;
use rdkafka::message::BorrowedMessage;

/// The message's parsed headers, or `None` when it has none. librdkafka parses them on the
/// first call and keeps them in the message.
fn native(m: &BorrowedMessage<'_>) -> Option<*const rdsys::rd_kafka_headers_t> {
    let mut headers = ptr::null_mut();
    // SAFETY: `m.ptr()` is the live message `m` borrows; librdkafka writes a pointer to headers
    // owned by that message (valid while it lives) or returns an error.
    let err = unsafe { rdsys::rd_kafka_message_headers(m.ptr(), &mut headers) };
    (err == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && !headers.is_null())
        .then_some(headers.cast_const())
}

/// How many headers the message has.
pub(crate) fn count(m: &BorrowedMessage<'_>) -> usize {
    // SAFETY: a headers pointer from `native`, valid while `m` lives.
    native(m).map_or(0, |h| unsafe { rdsys::rd_kafka_header_cnt(h) })
}

/// Header `idx` as (name, value): the name's bytes as they came, the value `None` for a
/// header without one.
pub(crate) fn get<'a>(
    m: &'a BorrowedMessage<'a>,
    idx: usize,
) -> Option<(&'a [u8], Option<&'a [u8]>)> {
    let headers = native(m)?;
    let (mut name, mut value, mut size) = (ptr::null(), ptr::null(), 0usize);
    // SAFETY: `headers` is valid while `m` lives; librdkafka checks `idx` and fills the three
    // out-parameters with pointers into those headers.
    let err =
        unsafe { rdsys::rd_kafka_header_get_all(headers, idx, &mut name, &mut value, &mut size) };
    if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
        return None;
    }
    // SAFETY: librdkafka stores each name NUL-terminated and each value as `size` bytes, both
    // owned by the message's headers, which live as long as `m` ('a).
    unsafe {
        Some((
            CStr::from_ptr(name).to_bytes(),
            (!value.is_null()).then(|| std::slice::from_raw_parts(value.cast::<u8>(), size)),
        ))
    }
}
