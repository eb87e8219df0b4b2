//! The one way a struct of counters is written: each counter is named once, in a list
//! (`stats_counters!` in [`crate::stats`], `udp_counters!` in [`crate::udp`]), and that list
//! is expanded into the struct, its `merge`, its `Display` (`key=value` pairs, the stopped
//! line's order), the array form the live atomics store ([`crate::live`]), and a table of
//! per-counter facts for exporters (the Prometheus metric of each [`crate::stats::Stats`]
//! counter, the drop reason of each [`crate::udp::UdpStats`] one). Adding a counter is one
//! entry in its list; every place that shows counters follows.
//!
//! A list is a `macro_rules!` that hands its entries to the macro named by its caller (the
//! "X-macro" pattern), so code in other crates (the stopped line's `tracing` fields, which
//! must be written as identifiers) expands the same list. The generator itself,
//! [`counter_struct!`], is exported too: the load generator's tallies are written with it.

/// The key a counter prints under: its field name, or the name after `as` (a helper of
/// [`counter_struct!`]).
#[doc(hidden)]
#[macro_export]
macro_rules! counter_key {
    ($field:ident) => {
        stringify!($field)
    };
    ($field:ident, $key:ident) => {
        stringify!($key)
    };
}

/// Writes a counter struct from a list (see the module doc): the struct with its docs,
/// `LEN`, `COUNTERS` (key and per-counter fact, in order), `merge`, `to_array`/`from_array`
/// and `Display`. Without a fact type (`pub struct Name;`, entries `field;`) the facts are
/// `()`: the load generator's tallies use it for their counts.
#[macro_export]
macro_rules! counter_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident;
        $( $(#[$fmeta:meta])* $field:ident; )*
    ) => {
        $crate::counter_struct! {
            $(#[$meta])*
            pub struct $name: ();
            $( $(#[$fmeta])* $field: (); )*
        }
    };
    (
        $(#[$meta:meta])*
        pub struct $name:ident: $fact:ty;
        $( $(#[$fmeta:meta])* $field:ident $(as $key:ident)? : $value:expr; )*
    ) => {
        $(#[$meta])*
        #[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: u64, )*
        }

        impl $name {
            /// How many counters there are.
            pub const LEN: usize = [$(stringify!($field)),*].len();

            /// Every counter's key (as `Display` and the stopped line print it) and its fact
            /// for exporters, in field order.
            pub const COUNTERS: [(&'static str, $fact); Self::LEN] =
                [$(($crate::counter_key!($field $(, $key)?), $value)),*];

            /// Adds another set of counters to these.
            pub fn merge(&mut self, o: &Self) {
                $(self.$field += o.$field;)*
            }

            /// The values in field order (what the live atomics store).
            pub fn to_array(&self) -> [u64; Self::LEN] {
                [$(self.$field),*]
            }

            /// The counters from values in field order.
            pub fn from_array(values: [u64; Self::LEN]) -> Self {
                let [$($field),*] = values;
                Self { $($field),* }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                for (i, ((key, _), v)) in Self::COUNTERS.iter().zip(self.to_array()).enumerate() {
                    if i > 0 {
                        f.write_str(" ")?;
                    }
                    write!(f, "{key}={v}")?;
                }
                Ok(())
            }
        }
    };
}
