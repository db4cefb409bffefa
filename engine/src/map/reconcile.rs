//! Reconciliation of a canonical Order to the cent: line subtotals (quantity x unit price), line
//! totals, and the order's subtotal, discount, shipping, tax and grand total. A record that does
//! not add up fails with every difference listed; nothing that does not reconcile passes silently.

use crate::convert::{self, Money};
use crate::doc::{Doc, Object, Str};
use crate::message::{Document, ErrorDetail, Failure, reason};
use rust_decimal::Decimal;

/// Options of the `reconcile` step.
#[derive(Debug, Clone)]
pub struct Reconcile {
    /// Largest difference accepted (default 0: exact to the cent).
    pub tolerance: Decimal,
    /// Write the derived amounts that are missing (line subtotal and total, order totals).
    pub fill: bool,
    /// Exception reason for amounts that do not add up.
    pub reason: String,
}

struct Check<'a> {
    errors: Vec<ErrorDetail>,
    currency: &'a str,
    tolerance: Decimal,
    currency_errors: usize,
}

impl Check<'_> {
    /// Pointers are built only when there is an error to report: this runs on every message.
    fn money(&mut self, v: Option<&Doc>, pointer: impl FnOnce() -> String) -> Option<Decimal> {
        let v = v?;
        let parsed = v.as_object().and_then(|o| {
            let amount = convert::parse_decimal(o.get("amount")?.as_str()?).ok().filter(|a| a.abs() <= convert::MAX_AMOUNT)?;
            Some((amount, o.get("currency")?.as_str()?))
        });
        match parsed {
            Some((amount, currency)) if currency == self.currency => Some(amount),
            Some((amount, currency)) => {
                self.currency_errors += 1;
                self.errors
                    .push(ErrorDetail::record(pointer(), format!("{amount} {currency} is not in the order currency {}", self.currency)));
                None
            }
            None => {
                self.errors
                    .push(ErrorDetail::record(pointer(), format!("expected money {{amount, currency}}, found {}", convert::describe(v))));
                None
            }
        }
    }

    fn sum(&mut self, list: Option<&Doc>, key: &str, pointer: impl Fn() -> String) -> Option<Decimal> {
        let items = list?.as_array()?;
        let mut total = Decimal::ZERO;
        for (i, item) in items.iter().enumerate() {
            total += self.money(item.get(key), || format!("{}/{i}/{key}", pointer())).unwrap_or_default();
        }
        Some(total)
    }

    /// Compares a stated amount with the computed one; returns whether they agree.
    fn compare(
        &mut self,
        stated: Option<Decimal>,
        computed: Decimal,
        pointer: impl FnOnce() -> String,
        how: impl FnOnce() -> String,
    ) -> bool {
        match stated {
            Some(s) if (s - computed).abs() > self.tolerance => {
                let pointer = pointer();
                let name = pointer.rsplit('/').next().unwrap_or("").to_string();
                self.errors.push(ErrorDetail::record(pointer, format!("{name} says {s} {}, but {} = {computed}", self.currency, how())));
                false
            }
            _ => true,
        }
    }
}

/// Writes `key` when the record does not state it.
fn set_money(obj: &mut Object, key: &str, mut amount: Decimal, currency: &str) -> Result<(), String> {
    if !obj.contains_key(key) {
        let exponent = convert::currency_exponent(currency)?;
        if amount.scale() < exponent {
            amount.rescale(exponent);
        }
        obj.push_unique(Str::new(key), Money { amount, currency: Str::new(currency) }.to_doc());
    }
    Ok(())
}

/// Quantities up to a billion: with amounts below `MAX_AMOUNT`, products and sums stay in range.
fn quantity(v: Option<&Doc>) -> Option<Decimal> {
    convert::decimal_from(v?).ok().filter(|q| q.abs() <= Decimal::from(1_000_000_000))
}

/// More lines than any order has; bounds the sums.
const MAX_LINES: usize = 10_000;

impl Reconcile {
    pub fn apply(&self, mut record: Doc, document: Document) -> Result<Doc, Failure> {
        let fail = |errors: Vec<ErrorDetail>, r: &str| {
            Failure::new(
                r.to_string(),
                errors
                    .into_iter()
                    .map(|mut e| {
                        e.document = document;
                        e
                    })
                    .collect(),
            )
        };
        let Some(order) = record.as_object() else {
            return Err(fail(vec![ErrorDetail::record("", "reconcile expects a canonical Order object")], &self.reason));
        };
        let Some(currency) = order.get("currency").and_then(Doc::as_str).map(str::to_string) else {
            return Err(fail(vec![ErrorDetail::record("/currency", "the order has no currency")], &self.reason));
        };
        let mut c = Check { errors: Vec::new(), currency: &currency, tolerance: self.tolerance, currency_errors: 0 };
        let include_tax = order.get("prices_include_tax").and_then(Doc::as_bool).unwrap_or(false);
        let empty = Vec::new();
        let lines = order.get("lines").and_then(Doc::as_array).unwrap_or(&empty);
        if lines.is_empty() {
            c.errors.push(ErrorDetail::record("/lines", "the order has no lines"));
        }
        if lines.len() > MAX_LINES {
            return Err(fail(
                vec![ErrorDetail::record("/lines", format!("the order has {} lines, more than {MAX_LINES}", lines.len()))],
                &self.reason,
            ));
        }

        // Lines: subtotal = quantity x unit price; total = subtotal - discount.
        let mut derived: Vec<(Decimal, Decimal)> = Vec::with_capacity(lines.len());
        let (mut subtotal, mut line_discounts, mut line_taxes, mut any_tax_detail) = (Decimal::ZERO, Decimal::ZERO, Decimal::ZERO, false);
        for (i, line) in lines.iter().enumerate() {
            let p = |k: &str| format!("/lines/{i}/{k}");
            let qty = quantity(line.get("quantity"));
            let unit = c.money(line.get("unit_price"), || p("unit_price"));
            let (Some(qty), Some(unit)) = (qty, unit) else {
                if qty.is_none() {
                    c.errors.push(ErrorDetail::record(p("quantity"), "the line has no quantity (a number up to a billion)"));
                }
                if line.get("unit_price").is_none() {
                    c.errors.push(ErrorDetail::record(p("unit_price"), "the line has no unit price"));
                }
                derived.push((Decimal::ZERO, Decimal::ZERO));
                continue;
            };
            let line_sub = qty * unit;
            let stated_sub = c.money(line.get("subtotal"), || p("subtotal"));
            c.compare(stated_sub, line_sub, || p("subtotal"), || format!("quantity {qty} x unit price {unit}"));
            let discount = c.money(line.get("discount"), || p("discount")).unwrap_or_default();
            let line_total = line_sub - discount;
            let stated_total = c.money(line.get("total"), || p("total"));
            c.compare(stated_total, line_total, || p("total"), || format!("subtotal {line_sub} - discount {discount}"));
            if line.get("taxes").and_then(Doc::as_array).is_some_and(|t| !t.is_empty()) {
                any_tax_detail = true;
            }
            line_taxes += c.sum(line.get("taxes"), "amount", || p("taxes")).unwrap_or_default();
            subtotal += line_sub;
            line_discounts += discount;
            derived.push((line_sub, line_total));
        }

        // Shipping charges (before their discounts) and their allocated discounts and taxes.
        let (mut shipping, mut shipping_discounts, mut shipping_taxes, mut any_shipping_detail) =
            (Decimal::ZERO, Decimal::ZERO, Decimal::ZERO, false);
        if let Some(ss) = order.get("shipping").and_then(Doc::as_array) {
            for (i, s) in ss.iter().enumerate() {
                any_shipping_detail = true;
                shipping += c.money(s.get("amount"), || format!("/shipping/{i}/amount")).unwrap_or_default();
                shipping_discounts += c.money(s.get("discount"), || format!("/shipping/{i}/discount")).unwrap_or_default();
                if s.get("taxes").and_then(Doc::as_array).is_some_and(|t| !t.is_empty()) {
                    any_tax_detail = true;
                }
                shipping_taxes += c.sum(s.get("taxes"), "amount", || format!("/shipping/{i}/taxes")).unwrap_or_default();
            }
        }
        // Discounts: `discounts[]` lists them; line and shipping `discount`s are their allocation.
        let allocated = line_discounts + shipping_discounts;
        let listed = c.sum(order.get("discounts"), "amount", || "/discounts".into());
        if let (Some(listed), true) = (listed, allocated != Decimal::ZERO) {
            c.compare(
                Some(listed),
                allocated,
                || "/discounts".into(),
                || format!("line discounts {line_discounts} + shipping discounts {shipping_discounts}"),
            );
        }
        let order_taxes = c.sum(order.get("taxes"), "amount", || "/taxes".into());
        let totals = order.get("totals");
        let stated = |c: &mut Check, k: &str| c.money(totals.and_then(|t| t.get(k)), || format!("/totals/{k}"));
        let (s_sub, s_disc, s_ship, s_tax, s_total) = (
            stated(&mut c, "subtotal"),
            stated(&mut c, "discount"),
            stated(&mut c, "shipping"),
            stated(&mut c, "tax"),
            stated(&mut c, "total"),
        );

        c.compare(s_sub, subtotal, || "/totals/subtotal".into(), || format!("the sum of {} line subtotal(s)", lines.len()));
        let discount = match listed {
            Some(l) => l,
            None if allocated != Decimal::ZERO => allocated,
            None => {
                // A discount nobody can trace to a code or a line cannot be posted per line.
                if let Some(d) = s_disc.filter(|d| d.abs() > self.tolerance) {
                    c.errors.push(ErrorDetail::record(
                        "/totals/discount",
                        format!("discount {d} {currency} is not itemised: no `discounts` and no line or shipping `discount` explains it"),
                    ));
                }
                s_disc.unwrap_or_default()
            }
        };
        c.compare(
            s_disc,
            discount,
            || "/totals/discount".into(),
            || {
                if listed.is_some() {
                    "the sum of discounts[]".to_string()
                } else {
                    format!("line discounts {line_discounts} + shipping discounts {shipping_discounts}")
                }
            },
        );
        let shipping = if any_shipping_detail { shipping } else { s_ship.unwrap_or_default() };
        c.compare(s_ship, shipping, || "/totals/shipping".into(), || "the sum of the shipping charges before discounts".to_string());
        let detail_tax = line_taxes + shipping_taxes;
        let tax = if any_tax_detail {
            if let Some(ot) = order_taxes {
                c.compare(
                    Some(ot),
                    detail_tax,
                    || "/taxes".into(),
                    || format!("line taxes {line_taxes} + shipping taxes {shipping_taxes}"),
                );
            }
            detail_tax
        } else {
            order_taxes.or(s_tax).unwrap_or_default()
        };
        c.compare(s_tax, tax, || "/totals/tax".into(), || format!("line taxes {line_taxes} + shipping taxes {shipping_taxes}"));
        let total = subtotal - discount + shipping + if include_tax { Decimal::ZERO } else { tax };
        match s_total {
            None => c.errors.push(ErrorDetail::record("/totals/total", "the order has no grand total to reconcile")),
            Some(_) => {
                c.compare(
                    s_total,
                    total,
                    || "/totals/total".into(),
                    || {
                        let tax_part = if include_tax { "(tax included in prices)".to_string() } else { format!("+ tax {tax}") };
                        format!("subtotal {subtotal} - discount {discount} + shipping {shipping} {tax_part}")
                    },
                );
            }
        }

        if !c.errors.is_empty() {
            let r = if c.currency_errors > 0 { reason::CURRENCY_MISMATCH } else { self.reason.as_str() };
            return Err(fail(c.errors, r));
        }
        if self.fill {
            let fill = |record: &mut Doc| -> Result<(), String> {
                let order = record.as_object_mut().ok_or("not an object")?;
                if let Some(lines) = order.get_mut("lines").and_then(Doc::as_array_mut) {
                    for (line, (sub, tot)) in lines.iter_mut().zip(&derived) {
                        if let Some(l) = line.as_object_mut() {
                            set_money(l, "subtotal", *sub, &currency)?;
                            set_money(l, "total", *tot, &currency)?;
                        }
                    }
                }
                let totals = order.entry_or_insert_with("totals", || Doc::Object(Object::new()));
                if let Some(t) = totals.as_object_mut() {
                    set_money(t, "subtotal", subtotal, &currency)?;
                    set_money(t, "discount", discount, &currency)?;
                    set_money(t, "shipping", shipping, &currency)?;
                    set_money(t, "tax", tax, &currency)?;
                }
                Ok(())
            };
            fill(&mut record).map_err(|m| fail(vec![ErrorDetail::record("", m)], reason::INVALID_VALUE))?;
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc;

    fn m(a: &str) -> Doc {
        doc!({"amount": a, "currency": "USD"})
    }

    fn rec() -> Reconcile {
        Reconcile { tolerance: Decimal::ZERO, fill: true, reason: reason::TOTALS_MISMATCH.into() }
    }

    #[test]
    fn a_consistent_order_passes_and_gets_its_derived_amounts() {
        let order = doc!({"currency": "USD", "lines": [
            {"quantity": 2, "unit_price": m("10.00"), "discount": m("1.00"), "taxes": [{"amount": m("1.14")}]},
            {"quantity": 1, "unit_price": m("5.50"), "taxes": [{"amount": m("0.33")}]}],
            "discounts": [{"code": "X", "amount": m("1.00"), "scope": "line"}, {"code": "Y", "amount": m("2.00"), "scope": "order"}],
            "shipping": [{"amount": m("8.50"), "discount": m("2.00"), "taxes": [{"amount": m("0.51")}]}],
            "totals": {"total": m("32.98")}});
        let out = rec().apply(order, Document::Record).unwrap();
        assert_eq!(out["lines"][0]["subtotal"], m("20.00"));
        assert_eq!(out["lines"][0]["total"], m("19.00"));
        assert_eq!(
            out["totals"],
            doc!({"total": m("32.98"), "subtotal": m("25.50"), "discount": m("3.00"), "shipping": m("8.50"), "tax": m("1.98")})
        );
    }

    #[test]
    fn every_difference_is_reported_with_its_pointer() {
        // The Shopify REST fixture: 3 x 199.00 lines, but a subtotal of 398.00.
        let order = doc!({"currency": "USD", "lines": [
            {"quantity": 1, "unit_price": m("199.00")}, {"quantity": 1, "unit_price": m("199.00")}, {"quantity": 1, "unit_price": m("199.00"), "subtotal": m("199.01")}],
            "totals": {"subtotal": m("398.00"), "tax": m("11.94"), "total": m("409.94")}});
        let f = rec().apply(order, Document::Record).unwrap_err();
        assert_eq!(f.reason, "totals_mismatch");
        let pointers: Vec<&str> = f.errors.iter().map(|e| e.pointer.as_str()).collect();
        assert_eq!(pointers, ["/lines/2/subtotal", "/totals/subtotal", "/totals/total"]);
        assert_eq!(f.errors[1].message, "subtotal says 398.00 USD, but the sum of 3 line subtotal(s) = 597.00");
    }

    #[test]
    fn discounts_must_be_itemised_and_allocations_must_add_up() {
        // Shopify's test webhook: a 20.00 discount with no code and no allocation.
        let order = doc!({"currency": "USD", "lines": [{"quantity": 1, "unit_price": m("369.97")}], "shipping": [{"amount": m("10.00")}],
            "totals": {"discount": m("20.00"), "total": m("359.97")}});
        let f = rec().apply(order, Document::Record).unwrap_err();
        assert_eq!(f.errors.len(), 1);
        assert_eq!(f.errors[0].pointer, "/totals/discount");
        assert!(f.errors[0].message.contains("not itemised"));
        let order = doc!({"currency": "USD", "lines": [{"quantity": 1, "unit_price": m("10.00"), "discount": m("1.00")}],
            "discounts": [{"amount": m("2.00")}], "totals": {"total": m("8.00")}});
        let f = rec().apply(order, Document::Record).unwrap_err();
        assert_eq!(f.errors[0].pointer, "/discounts");
    }

    #[test]
    fn absurd_amounts_are_reported_not_overflowed() {
        let order = doc!({"currency": "USD", "lines": [{"quantity": 10000000000u64, "unit_price": m("999999999999999.00")}], "totals": {"total": m("1.00")}});
        let f = rec().apply(order, Document::Record).unwrap_err();
        assert_eq!(f.errors[0].pointer, "/lines/0/quantity");
        let order = doc!({"currency": "USD", "lines": [{"quantity": 1, "unit_price": m("79228162514264337593543950335")}], "totals": {"total": m("1.00")}});
        assert!(rec().apply(order, Document::Record).is_err());
    }

    #[test]
    fn tolerance_tax_inclusive_prices_and_foreign_currencies() {
        let order = doc!({"currency": "EUR", "prices_include_tax": true, "lines": [{"quantity": 3, "unit_price": {"amount": "3.33", "currency": "EUR"}}],
            "totals": {"tax": {"amount": "1.60", "currency": "EUR"}, "total": {"amount": "10.00", "currency": "EUR"}}});
        let mut r = rec();
        assert!(r.apply(order.clone(), Document::Record).is_err());
        r.tolerance = Decimal::new(1, 2);
        assert!(r.apply(order, Document::Record).is_ok());
        let gbp = doc!({"currency": "JPY", "lines": [{"quantity": 1, "unit_price": {"amount": "26", "currency": "JPY"}, "taxes": [{"amount": {"amount": "41.99", "currency": "GBP"}}]}], "totals": {"total": {"amount": "26", "currency": "JPY"}}});
        let f = rec().apply(gbp, Document::Record).unwrap_err();
        assert_eq!(f.reason, "currency_mismatch");
        assert_eq!(f.errors[0].pointer, "/lines/0/taxes/0/amount");
    }
}
