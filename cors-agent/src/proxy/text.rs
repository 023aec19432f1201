//! Numbers and addresses appended to byte buffers without `core::fmt`, for the text the agent
//! writes on every request (forwarding headers, access-log lines): formatting through
//! `Display` cost more than the rest of either.

use std::io::Write as _;
use std::net::IpAddr;

pub(super) fn push_number(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// An IP address as `Display` prints it (IPv6 without brackets).
pub(super) fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(ip) => {
            for (i, octet) in ip.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_number(out, octet);
            }
        }
        // Rare enough here to keep the standard library's compression rules.
        IpAddr::V6(ip) => {
            let _ = write!(out, "{ip}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ips_print_as_display_does() {
        for ip in [
            "10.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "2001:db8::8:800:200c:417a",
        ] {
            let parsed: IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            push_ip(&mut out, parsed);
            assert_eq!(out, ip.as_bytes());
        }
    }
}
