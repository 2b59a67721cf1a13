"""Forms of the web pages. They check shapes; the services they feed check the rules."""

from __future__ import annotations

from decimal import Decimal

from django import forms

MICRO = 1_000_000  # micro-credits per credit


class SignupForm(forms.Form):
    username = forms.CharField(
        max_length=150,
        min_length=3,
        help_text="3 to 150 letters, digits or . @ + - _",
        widget=forms.TextInput(attrs={"autocomplete": "username", "autofocus": True}),
    )
    email = forms.EmailField(required=False, help_text="optional")
    password1 = forms.CharField(
        label="Password", strip=False, widget=forms.PasswordInput(attrs={"autocomplete": "new-password"})
    )
    password2 = forms.CharField(
        label="Password again", strip=False, widget=forms.PasswordInput(attrs={"autocomplete": "new-password"})
    )

    def clean(self) -> dict:
        data = super().clean()
        if data.get("password1") and data.get("password2") and data["password1"] != data["password2"]:
            self.add_error("password2", "the two passwords differ")
        return data


class ApiKeyCreateForm(forms.Form):
    name = forms.CharField(max_length=100, required=False, help_text="to tell your keys apart, e.g. laptop")


class CreditsField(forms.DecimalField):
    """An amount typed in credits (up to six decimals), cleaned to integer micro-credits."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(min_value=Decimal("0.000001"), max_digits=16, decimal_places=6, **kwargs)  # type: ignore[arg-type]

    def clean(self, value: object) -> int:  # type: ignore[override]
        amount = super().clean(value)
        return int(amount * MICRO)  # exact: at most six decimals


class TopUpForm(forms.Form):
    credits = forms.IntegerField(min_value=1, help_text="whole credits")


class PayoutRequestForm(forms.Form):
    provider = forms.IntegerField(min_value=1, widget=forms.HiddenInput)
    amount = CreditsField(label="Credits", help_text="at most what the provider has earned")


class PayoutDecisionForm(forms.Form):
    note = forms.CharField(max_length=200, required=False)
