//! Value conversions shared by field maps, scripts and checks: decimal money in the four shapes
//! channels send, integers from strings, and dates normalised to RFC 3339 UTC.

use crate::doc::{Doc, Number, Object, Str};
use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, SecondsFormat, TimeZone, Utc};
use rust_decimal::Decimal;

/// A short description of a JSON value for messages ("string \"abc\"", "number 4.5", "an object").
pub fn describe(v: &Doc) -> String {
    match v {
        Doc::Null => "null".into(),
        Doc::Bool(b) => format!("boolean {b}"),
        Doc::Number(n) => format!("number {n}"),
        Doc::String(s) if s.chars().count() > 40 => format!("string \"{}…\"", s.chars().take(40).collect::<String>()),
        Doc::String(s) => format!("string \"{s}\""),
        Doc::Array(_) => "a list".into(),
        Doc::Object(_) => "an object".into(),
    }
}

/// A decimal from a decimal string ("19.99", "1.5E3") or a JSON number (via its shortest exact
/// text, so 1397.3 is 1397.3, not 1397.2999999999999545).
pub fn decimal_from(v: &Doc) -> Result<Decimal, String> {
    match v {
        Doc::String(s) => parse_decimal(s),
        Doc::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(Decimal::from(i))
            } else if let Some(u) = n.as_u64() {
                Ok(Decimal::from(u))
            } else {
                parse_decimal(float_text(n, &mut zmij::Buffer::new())?)
            }
        }
        other => Err(format!("expected a decimal number, found {}", describe(other))),
    }
}

/// A JSON number with a fraction as its shortest text, as serde_json prints it. A binary float's
/// shortest text is exact up to 15 significant digits; beyond that the sender's digits may
/// already be lost, which is an error.
fn float_text<'b>(n: &Number, buf: &'b mut zmij::Buffer) -> Result<&'b str, String> {
    let text = buf.format_finite(n.as_f64().unwrap_or_default());
    let significant = text
        .trim_start_matches('-')
        .split(['e', 'E'])
        .next()
        .unwrap_or("")
        .trim_start_matches(['0', '.'])
        .chars()
        .filter(char::is_ascii_digit)
        .count();
    if significant > 15 {
        return Err(format!("number {text} has more digits than a JSON number keeps exactly; send it as a decimal string"));
    }
    Ok(text)
}

pub fn parse_decimal(s: &str) -> Result<Decimal, String> {
    let t = s.trim();
    let t = t.strip_prefix('+').unwrap_or(t);
    if t.contains(',') {
        return Err(format!("\"{s}\" is not a decimal number: remove the thousands separator (`,`), the decimal separator is `.`"));
    }
    if t.contains(['e', 'E']) {
        return Decimal::from_scientific(t).map_err(|_| format!("\"{s}\" is not a decimal number"));
    }
    Decimal::from_str_exact(t).map_err(|_| format!("\"{s}\" is not a decimal number"))
}

/// The largest amount of money accepted (a quadrillion): no retail amount comes near it, and
/// keeping amounts below it keeps every sum and product of an order inside `Decimal`'s range.
pub const MAX_AMOUNT: Decimal = Decimal::from_parts(0xA4C6_8000, 0x38D7E, 0, false, 0);

/// The number of minor-unit digits of an ISO 4217 currency (2 for USD, 0 for JPY, 3 for KWD).
pub fn currency_exponent(code: &str) -> Result<u32, String> {
    // Orders come in runs of one currency: remember the last answer per thread.
    thread_local! {
        static LAST: std::cell::RefCell<([u8; 3], u32)> = const { std::cell::RefCell::new(([0; 3], 0)) };
    }
    let key: Option<[u8; 3]> = code.as_bytes().try_into().ok();
    if let Some(k) = key
        && let Some(e) = LAST.with(|l| (l.borrow().0 == k).then(|| l.borrow().1))
    {
        return Ok(e);
    }
    let c = iso_currency::Currency::from_code(code).ok_or_else(|| format!("\"{code}\" is not an ISO 4217 currency code"))?;
    let e = u32::from(c.exponent().unwrap_or(2));
    if let Some(k) = key {
        LAST.with(|l| *l.borrow_mut() = (k, e));
    }
    Ok(e)
}

/// How many decimal places money may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// At most the currency's minor units (2 for USD, 0 for JPY); more is an error.
    #[default]
    Currency,
    /// Keep every digit sent (unit prices in fractions of a cent).
    Keep,
}

/// An amount in a currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Money {
    pub amount: Decimal,
    pub currency: Str,
}

/// A decimal as text, as `Decimal`'s `Display` writes it, without the formatting machinery
/// (money is written many times per message).
pub fn decimal_text(d: &Decimal) -> String {
    decimal_str(d).to_string()
}

/// [`decimal_text`] as a document string, built on the stack (money amounts fit inline).
pub fn decimal_str(d: &Decimal) -> Str {
    let scale = d.scale() as usize;
    let mut digits_buf = itoa::Buffer::new();
    let digits = digits_buf.format(d.mantissa().unsigned_abs()).as_bytes();
    // sign + up to 29 digits + point + leading zeros up to the scale (max 28).
    let mut out = [0u8; 64];
    let mut n = 0;
    if d.is_sign_negative() && !d.is_zero() {
        out[n] = b'-';
        n += 1;
    }
    if scale == 0 {
        out[n..n + digits.len()].copy_from_slice(digits);
        n += digits.len();
    } else {
        let int_len = digits.len().saturating_sub(scale);
        if int_len == 0 {
            out[n] = b'0';
            n += 1;
        } else {
            out[n..n + int_len].copy_from_slice(&digits[..int_len]);
            n += int_len;
        }
        out[n] = b'.';
        n += 1;
        for _ in digits.len()..scale {
            out[n] = b'0';
            n += 1;
        }
        let frac = &digits[int_len..];
        out[n..n + frac.len()].copy_from_slice(frac);
        n += frac.len();
    }
    Str::new(std::str::from_utf8(&out[..n]).expect("ASCII digits"))
}

const AMOUNT: Str = Str::from_static("amount");
const CURRENCY: Str = Str::from_static("currency");

impl Money {
    pub fn to_doc(&self) -> Doc {
        money_object(Doc::String(decimal_str(&self.amount)), self.currency.clone())
    }

    /// Reads canonical money `{amount, currency}`.
    pub fn from_canonical(v: &Doc) -> Option<Money> {
        let o = v.as_object()?;
        Some(Money { amount: parse_decimal(o.get("amount")?.as_str()?).ok()?, currency: Str::new(o.get("currency")?.as_str()?) })
    }
}

/// A decimal as its text: `decimal_from` then `decimal_str`, except that text already written
/// as `decimal_str` writes it ("0.06"), given as a string or as a JSON number's shortest text, is
/// kept as it is, not parsed and printed again.
pub fn decimal_doc(v: &Doc) -> Result<Doc, String> {
    match v {
        Doc::String(s) if plain_decimal(s).is_some_and(|(int, frac)| int + frac <= 27) => Ok(v.clone()),
        // A fraction such as a tax rate (0.06): the text `decimal_from` reads already is the
        // decimal's text when it is plain and within 15 digits.
        Doc::Number(n) if n.is_f64() => {
            let mut buf = zmij::Buffer::new();
            let text = float_text(n, &mut buf)?;
            if plain_decimal(text).is_some_and(|(int, frac)| int + frac <= 15) {
                Ok(Doc::String(Str::new(text)))
            } else {
                parse_decimal(text).map(|d| Doc::String(decimal_str(&d)))
            }
        }
        _ => decimal_from(v).map(|d| Doc::String(decimal_str(&d))),
    }
}

/// Money as canonical JSON `{amount, currency}`: `money_from` then `to_doc`, except that an
/// amount already written as its currency wants ("12.50" USD) is kept as it is, not parsed and
/// printed again (most amounts channels send; a third of the field map's time went there).
pub fn money_doc(v: &Doc, currency: Option<&str>, minor_units: bool, precision: Precision) -> Result<Doc, String> {
    if let (Doc::String(s), Some(code), false) = (v, currency, minor_units)
        && code.len() == 3
        && code.bytes().all(|b| b.is_ascii_uppercase())
        && let Some((int, frac)) = plain_decimal(s)
        // Up to 15 integer digits stays within MAX_AMOUNT.
        && int <= 15
        && currency_exponent(code).is_ok_and(|e| e as usize == frac)
    {
        return Ok(money_object(v.clone(), Str::new(code)));
    }
    money_from(v, currency, minor_units, precision).map(|m| m.to_doc())
}

/// Canonical money: `{"amount": "12.50", "currency": "USD"}`.
fn money_object(amount: Doc, currency: Str) -> Doc {
    let mut m = Object::with_capacity(2);
    m.push_unique(AMOUNT, amount);
    m.push_unique(CURRENCY, Doc::String(currency));
    Doc::Object(m)
}

/// The integer and fraction digit counts of a decimal written as `decimal_str` writes one:
/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?`, and not a negative zero.
fn plain_decimal(s: &str) -> Option<(usize, usize)> {
    let b = s.as_bytes();
    let negative = b.first() == Some(&b'-');
    let digits = &b[usize::from(negative)..];
    let int = digits.iter().take_while(|c| c.is_ascii_digit()).count();
    if int == 0 || (int > 1 && digits[0] == b'0') {
        return None;
    }
    let frac = match &digits[int..] {
        [] => 0,
        [b'.', rest @ ..] if !rest.is_empty() && rest.iter().all(u8::is_ascii_digit) => rest.len(),
        _ => return None,
    };
    if negative && digits.iter().all(|c| *c == b'0' || *c == b'.') {
        return None;
    }
    Some((int, frac))
}

const AMOUNT_KEYS: [&str; 4] = ["amount", "Amount", "value", "Value"];
const CURRENCY_KEYS: [&str; 6] = ["currency", "currency_code", "currencyCode", "CurrencyCode", "Currency", "currency_iso"];

/// Money from a decimal string, a JSON number, integer minor units (`minor_units`), or an object
/// such as `{Amount, CurrencyCode}`, `{amount, currency_code}`, `{value, currency}`, `{amount, currency}`.
/// An object's own currency wins over `currency` (the order currency).
pub fn money_from(v: &Doc, currency: Option<&str>, minor_units: bool, precision: Precision) -> Result<Money, String> {
    let (amount_v, own_currency) = match v {
        Doc::Object(o) => {
            let amount = AMOUNT_KEYS.iter().find_map(|k| o.get(k)).ok_or_else(|| {
                format!("expected a money object with an amount (`{}`), found keys {}", AMOUNT_KEYS.join("`, `"), keys_of(o))
            })?;
            let cur = CURRENCY_KEYS.iter().find_map(|k| o.get(k)).and_then(Doc::as_str);
            (amount, cur)
        }
        other => (other, None),
    };
    let code =
        own_currency.or(currency).ok_or("no currency: set `currency:` on this field (a code like USD or a path like $root.currency)")?;
    let code = code.trim();
    let code = if code.bytes().any(|b| b.is_ascii_lowercase()) { Str::from(code.to_ascii_uppercase()) } else { Str::new(code) };
    let exponent = currency_exponent(&code)?;
    let mut amount = if minor_units {
        match amount_v {
            Doc::Number(n) if n.as_i64().is_some() => Decimal::new(n.as_i64().unwrap_or_default(), exponent),
            Doc::String(s) => {
                let i: i64 = s.trim().parse().map_err(|_| format!("\"{s}\" is not a whole number of minor units"))?;
                Decimal::new(i, exponent)
            }
            other => return Err(format!("expected a whole number of minor units, found {}", describe(other))),
        }
    } else {
        decimal_from(amount_v)?
    };
    if amount.abs() > MAX_AMOUNT {
        return Err(format!("{amount} {code} is too large for an amount (the limit is {MAX_AMOUNT})"));
    }
    if amount.scale() > exponent {
        // Trailing zeros beyond the currency's minor units carry no information: drop them.
        let normalized = amount.normalize();
        if normalized.scale() > exponent && precision == Precision::Currency {
            return Err(format!("{amount} {code} has more decimal places than {code} allows ({exponent})"));
        }
        amount = normalized;
    }
    if amount.scale() < exponent {
        amount.rescale(exponent);
    }
    Ok(Money { amount, currency: code })
}

fn keys_of(o: &Object) -> String {
    let k: Vec<&str> = o.keys().take(6).collect();
    format!("`{}`", k.join("`, `"))
}

/// An integer from a JSON integer, an integral decimal, or a string of digits ("2", "-1", "2.0").
pub fn integer_from(v: &Doc) -> Result<Doc, String> {
    match v {
        Doc::Number(n) if n.is_i64() || n.is_u64() => Ok(v.clone()),
        Doc::Number(_) | Doc::String(_) => {
            let d = decimal_from(v).map_err(|_| format!("expected a whole number, found {}", describe(v)))?;
            if !d.fract().is_zero() {
                return Err(format!("expected a whole number, found {}", describe(v)));
            }
            let d = d.trunc();
            i64::try_from(d).map(Doc::from).map_err(|_| format!("{d} is too large for a whole number"))
        }
        other => Err(format!("expected a whole number, found {}", describe(other))),
    }
}

/// A JSON number from a decimal string or number, refusing values a JSON number would round.
pub fn number_from(v: &Doc) -> Result<Doc, String> {
    if let Doc::Number(_) = v {
        return Ok(v.clone());
    }
    let d = decimal_from(v)?;
    decimal_to_number(d)
}

/// A decimal as a JSON number, when it fits exactly (integers, or up to 15 significant digits).
pub fn decimal_to_number(d: Decimal) -> Result<Doc, String> {
    let d = d.normalize();
    if d.scale() == 0
        && let Ok(i) = i64::try_from(d)
    {
        return Ok(Doc::from(i));
    }
    let text = d.to_string();
    let f: f64 = text.parse().map_err(|_| format!("{d} is not a number"))?;
    let back = Number::from_f64(f).ok_or_else(|| format!("{d} is not a finite number"))?;
    match parse_decimal(&back.to_string()) {
        Ok(b) if b == d => Ok(Doc::Number(back)),
        _ => Err(format!("{d} cannot be written exactly as a JSON number; keep it as a decimal string")),
    }
}

/// A number's JSON text handed to `f`: integers (ids, every digit kept) through a stack buffer,
/// not an allocated string.
pub fn with_number_text<R>(n: &Number, f: impl FnOnce(&str) -> R) -> R {
    match (n.as_u64(), n.as_i64()) {
        (Some(u), _) => f(itoa::Buffer::new().format(u)),
        (_, Some(i)) => f(itoa::Buffer::new().format(i)),
        _ => f(&n.to_string()),
    }
}

/// A string from a string, number or boolean (integer ids keep every digit).
pub fn string_from(v: &Doc) -> Result<Doc, String> {
    match v {
        Doc::String(_) => Ok(v.clone()),
        Doc::Number(n) => Ok(with_number_text(n, |text| Doc::from(text))),
        Doc::Bool(b) => Ok(Doc::from(if *b { "true" } else { "false" })),
        other => Err(format!("expected text, found {}", describe(other))),
    }
}

/// A boolean from a boolean, `"true"`/`"false"`, `"yes"`/`"no"`, `"1"`/`"0"` (any case) or 1/0.
pub fn boolean_from(v: &Doc) -> Result<Doc, String> {
    let b = match v {
        Doc::Bool(b) => *b,
        Doc::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "y" | "1" | "t" => true,
            "false" | "no" | "n" | "0" | "f" => false,
            _ => return Err(format!("expected true or false, found {}", describe(v))),
        },
        Doc::Number(n) if n.as_i64() == Some(1) => true,
        Doc::Number(n) if n.as_i64() == Some(0) => false,
        other => return Err(format!("expected true or false, found {}", describe(other))),
    };
    Ok(Doc::Bool(b))
}

/// The timezone naive times are in (store-local POS exports, WooCommerce `date_created`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Zone {
    Fixed(FixedOffset),
    Named(chrono_tz::Tz),
}

impl Zone {
    pub fn parse(s: &str) -> Result<Zone, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("utc") || t == "Z" {
            return Ok(Zone::Fixed(FixedOffset::east_opt(0).expect("zero offset")));
        }
        if t.starts_with(['+', '-'])
            && let Ok(dt) = DateTime::parse_from_str(&format!("2000-01-01T00:00:00{t}"), "%Y-%m-%dT%H:%M:%S%:z")
        {
            return Ok(Zone::Fixed(*dt.offset()));
        }
        t.parse::<chrono_tz::Tz>()
            .map(Zone::Named)
            .map_err(|_| format!("\"{s}\" is not a timezone: use an IANA name like America/New_York or an offset like +02:00"))
    }

    fn localize(&self, naive: NaiveDateTime) -> Result<DateTime<Utc>, String> {
        let r = match self {
            Zone::Fixed(o) => o.from_local_datetime(&naive).single().map(|d| d.with_timezone(&Utc)),
            Zone::Named(tz) => tz.from_local_datetime(&naive).earliest().map(|d| d.with_timezone(&Utc)),
        };
        r.ok_or_else(|| format!("{naive} does not exist in the timezone (daylight saving gap)"))
    }
}

/// Units of a numeric timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Epoch {
    Seconds,
    Milliseconds,
}

/// Options for reading a date or time.
#[derive(Debug, Clone, Default)]
pub struct DateOptions {
    /// A chrono `strftime` format for odd layouts, e.g. `%m/%d/%Y %H:%M:%S`.
    pub format: Option<String>,
    /// For times without an offset. Default UTC.
    pub timezone: Option<Zone>,
    /// For numbers; default: milliseconds when above 10^11, else seconds.
    pub epoch: Option<Epoch>,
}

/// Reads the date-time formats channels send and returns the instant.
/// RFC 3339 with `Z` or an offset (with or without fraction), ISO 8601 without an offset (in
/// `timezone`), RFC 2822, a date alone (midnight), epoch seconds or milliseconds as a number or
/// string (also in scientific notation, as Amazon's sandbox sends).
pub fn datetime_from(v: &Doc, opts: &DateOptions) -> Result<DateTime<Utc>, String> {
    let zone = opts.timezone.unwrap_or(Zone::Fixed(FixedOffset::east_opt(0).expect("zero")));
    match v {
        Doc::Number(_) => epoch_to_datetime(decimal_from(v)?, opts.epoch),
        Doc::String(s) => {
            let t = s.trim();
            if let Some(fmt) = &opts.format {
                if let Ok(d) = DateTime::parse_from_str(t, fmt) {
                    return Ok(d.with_timezone(&Utc));
                }
                if let Ok(n) = NaiveDateTime::parse_from_str(t, fmt) {
                    return zone.localize(n);
                }
                if let Ok(d) = NaiveDate::parse_from_str(t, fmt) {
                    return zone.localize(d.and_time(NaiveTime::MIN));
                }
                return Err(format!("\"{s}\" does not match the format `{fmt}`"));
            }
            if let Ok(d) = DateTime::parse_from_rfc3339(t) {
                return Ok(d.with_timezone(&Utc));
            }
            for f in ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%:z", "%Y-%m-%d %H:%M:%S%.f%z"] {
                if let Ok(d) = DateTime::parse_from_str(t, f) {
                    return Ok(d.with_timezone(&Utc));
                }
            }
            if let Ok(d) = DateTime::parse_from_rfc2822(t) {
                return Ok(d.with_timezone(&Utc));
            }
            for f in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M"] {
                if let Ok(n) = NaiveDateTime::parse_from_str(t, f) {
                    return zone.localize(n);
                }
            }
            if let Ok(d) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
                return zone.localize(d.and_time(NaiveTime::MIN));
            }
            if !t.is_empty()
                && t.chars().all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
                && let Ok(d) = parse_decimal(t)
            {
                return epoch_to_datetime(d, opts.epoch);
            }
            Err(format!("\"{s}\" is not a date-time I can read; add `format:` (for example `%m/%d/%Y %H:%M:%S`) to this field"))
        }
        other => Err(format!("expected a date-time, found {}", describe(other))),
    }
}

fn epoch_to_datetime(d: Decimal, unit: Option<Epoch>) -> Result<DateTime<Utc>, String> {
    let unit = unit.unwrap_or(if d.abs() >= Decimal::from(100_000_000_000i64) { Epoch::Milliseconds } else { Epoch::Seconds });
    let millis = match unit {
        Epoch::Seconds => d.checked_mul(Decimal::from(1000)).ok_or_else(|| format!("{d} is out of range for a timestamp"))?,
        Epoch::Milliseconds => d,
    };
    let millis = i64::try_from(millis.round()).map_err(|_| format!("{d} is out of range for a timestamp"))?;
    Utc.timestamp_millis_opt(millis).single().ok_or_else(|| format!("{d} is out of range for a timestamp"))
}

/// RFC 3339 in UTC with `Z`, keeping fractional seconds only when present.
pub fn format_datetime(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// A calendar date `YYYY-MM-DD`: a date alone stays as written; a date-time becomes its UTC date
/// unless `timezone` says which local date is meant.
pub fn date_from(v: &Doc, opts: &DateOptions) -> Result<String, String> {
    if let Doc::String(s) = v
        && opts.format.is_none()
        && let Ok(d) = NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
    {
        return Ok(d.to_string());
    }
    let t = datetime_from(v, opts)?;
    Ok(match opts.timezone {
        Some(Zone::Fixed(o)) => t.with_timezone(&o).date_naive().to_string(),
        Some(Zone::Named(tz)) => t.with_timezone(&tz).date_naive().to_string(),
        None => t.date_naive().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc;

    fn m(v: Doc, cur: Option<&str>, minor: bool) -> Result<Doc, String> {
        money_from(&v, cur, minor, Precision::Currency).map(|m| m.to_doc())
    }

    #[test]
    fn amounts_kept_as_written_are_the_amounts_parsing_would_print() {
        let texts = [
            "12.50",
            "12.5",
            "012.50",
            "-0.00",
            "-0",
            "-12.50",
            "0.00",
            "0",
            "1e3",
            " 12.50",
            "12.500",
            "1000",
            "1.234",
            "0.06",
            "-0.06",
            "999999999999999.99",
            "1000000000000000.00",
            "12.",
            ".5",
            "1,000.00",
            "+12.50",
            "abc",
            "",
        ];
        for text in texts {
            for cur in [Some("USD"), Some("JPY"), Some("KWD"), Some("usd"), Some("XYZ"), None] {
                let v = Doc::from(text);
                assert_eq!(money_doc(&v, cur, false, Precision::Currency), m(v.clone(), cur, false), "{text:?} {cur:?}");
            }
            let v = Doc::from(text);
            assert_eq!(decimal_doc(&v), decimal_from(&v).map(|d| Doc::String(decimal_str(&d))), "{text:?}");
        }
        // JSON numbers: the shortcut for plain texts gives what parsing and printing gives, and the
        // rest (exponents, negative zero, more than 15 digits) still go the long way.
        let numbers = [0.06, 0.0725, 1.0, -2.5, -0.0, 0.1 + 0.2, 123456789012.345, 1e-7, 1.5e300, 12345678901234567.0, 0.000001];
        for f in numbers {
            let v = Doc::from(&serde_json::json!(f));
            assert_eq!(decimal_doc(&v), decimal_from(&v).map(|d| Doc::String(decimal_str(&d))), "{f:?}");
        }
        assert_eq!(decimal_doc(&doc!(0.06)).unwrap(), doc!("0.06"));
        assert!(decimal_doc(&doc!(0.30000000000000004)).unwrap_err().contains("more digits"));
        assert_eq!(string_from(&doc!(5000000000018u64)).unwrap(), doc!("5000000000018"));
        assert_eq!(string_from(&doc!(-7)).unwrap(), doc!("-7"));
        assert_eq!(string_from(&doc!(1.5)).unwrap(), doc!("1.5"));
    }

    #[test]
    fn money_in_every_shape_channels_send() {
        assert_eq!(m(doc!("199.00"), Some("USD"), false).unwrap(), doc!({"amount": "199.00", "currency": "USD"}));
        assert_eq!(m(doc!("41.8"), Some("eur"), false).unwrap(), doc!({"amount": "41.80", "currency": "EUR"}));
        assert_eq!(m(doc!(1397.3), Some("USD"), false).unwrap(), doc!({"amount": "1397.30", "currency": "USD"}));
        assert_eq!(m(doc!(3), Some("USD"), false).unwrap(), doc!({"amount": "3.00", "currency": "USD"}));
        assert_eq!(m(doc!({"amount": 1599, "currency": "USD"}), None, true).unwrap(), doc!({"amount": "15.99", "currency": "USD"}));
        assert_eq!(m(doc!({"amount": 500, "currency": "JPY"}), None, true).unwrap(), doc!({"amount": "500", "currency": "JPY"}));
        assert_eq!(
            m(doc!({"CurrencyCode": "EUR", "Amount": "11.01"}), Some("USD"), false).unwrap(),
            doc!({"amount": "11.01", "currency": "EUR"})
        );
        assert_eq!(m(doc!({"value": "-13.24", "currency": "EUR"}), None, false).unwrap(), doc!({"amount": "-13.24", "currency": "EUR"}));
        assert_eq!(m(doc!("10.000"), Some("USD"), false).unwrap(), doc!({"amount": "10.00", "currency": "USD"}));
    }

    #[test]
    fn huge_values_are_errors_not_crashes() {
        assert_eq!(MAX_AMOUNT.to_string(), "1000000000000000");
        assert!(m(doc!("10000000000000000000.00"), Some("USD"), false).unwrap_err().contains("too large"));
        assert!(decimal_from(&doc!(12345678901234567.89)).unwrap_err().contains("decimal string"));
        assert_eq!(decimal_from(&doc!(1397.3)).unwrap().to_string(), "1397.3");
        assert!(datetime_from(&doc!(1e27), &DateOptions { epoch: Some(Epoch::Seconds), ..Default::default() }).is_err());
    }

    #[test]
    fn money_refuses_what_would_lose_cents() {
        let e = m(doc!("25.99"), Some("JPY"), false).unwrap_err();
        assert!(e.contains("more decimal places than JPY allows (0)"), "{e}");
        assert!(m(doc!("1,234.50"), Some("USD"), false).unwrap_err().contains("thousands separator"));
        assert!(m(doc!("12"), Some("XYZ"), false).unwrap_err().contains("ISO 4217"));
        assert!(m(doc!("12"), None, false).unwrap_err().contains("no currency"));
        assert!(m(doc!(true), Some("USD"), false).is_err());
        let kept = money_from(&doc!("0.0125"), Some("USD"), false, Precision::Keep).unwrap();
        assert_eq!(kept.amount.to_string(), "0.0125");
    }

    #[test]
    fn decimal_text_matches_display() {
        for s in [
            "0",
            "0.00",
            "-0.05",
            "1397.30",
            "-13.24",
            "123456789.123456789",
            "0.0001",
            "-1",
            "-0.00",
            "79228162514264337593543950335",
            "0.0000000000000000000000000001",
        ] {
            let d = parse_decimal(s).unwrap();
            assert_eq!(decimal_text(&d), d.to_string(), "{s}");
        }
    }

    #[test]
    fn integers_numbers_strings_booleans() {
        assert_eq!(integer_from(&doc!("2")).unwrap(), doc!(2));
        assert_eq!(integer_from(&doc!("2.0")).unwrap(), doc!(2));
        assert!(integer_from(&doc!("2.5")).is_err());
        assert!(integer_from(&doc!("2.5x")).is_err());
        assert_eq!(number_from(&doc!("1397.30")).unwrap(), doc!(1397.3));
        assert!(number_from(&doc!("12345678901234567.89")).is_err());
        assert_eq!(string_from(&doc!(820982911946154508u64)).unwrap(), doc!("820982911946154508"));
        assert_eq!(boolean_from(&doc!("false")).unwrap(), doc!(false));
        assert_eq!(boolean_from(&doc!("Yes")).unwrap(), doc!(true));
    }

    #[test]
    fn dates_from_every_channel_become_rfc3339_utc() {
        let o = DateOptions::default();
        let f = |v: Doc, o: &DateOptions| datetime_from(&v, o).map(|t| format_datetime(&t));
        assert_eq!(f(doc!("2008-01-10T11:00:00-05:00"), &o).unwrap(), "2008-01-10T16:00:00Z");
        assert_eq!(f(doc!("2019-05-07T15:42:57.058Z"), &o).unwrap(), "2019-05-07T15:42:57.058Z");
        assert_eq!(f(doc!("Fri, 02 Mar 2012 21:36:24 +0000"), &o).unwrap(), "2012-03-02T21:36:24Z");
        assert_eq!(f(doc!(1568466571000i64), &o).unwrap(), "2019-09-14T13:09:31Z");
        assert_eq!(f(doc!("1.569521782042E9"), &o).unwrap(), "2019-09-26T18:16:22.042Z");
        assert_eq!(f(doc!("2023-09-01"), &o).unwrap(), "2023-09-01T00:00:00Z");
        let ny = DateOptions { timezone: Some(Zone::parse("America/New_York").unwrap()), ..Default::default() };
        assert_eq!(f(doc!("2017-03-22T16:28:02"), &ny).unwrap(), "2017-03-22T20:28:02Z");
        let pos =
            DateOptions { format: Some("%m/%d/%Y %H:%M:%S".into()), timezone: Some(Zone::parse("-05:00").unwrap()), ..Default::default() };
        assert_eq!(f(doc!("11/26/2026 09:14:07"), &pos).unwrap(), "2026-11-26T14:14:07Z");
        assert!(f(doc!("26.11.2026"), &o).unwrap_err().contains("format:"));
        assert_eq!(date_from(&doc!("2008-01-10T23:00:00-05:00"), &o).unwrap(), "2008-01-11");
        assert_eq!(date_from(&doc!("2023-09-01"), &o).unwrap(), "2023-09-01");
    }
}
