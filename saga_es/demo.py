"""The trip story behind `saga-es demo`: a flight, tourist tickets and a hotel.

It lives in the package (not in the CLI) so its context type stays importable:
a later process reading the stored sagas rebuilds `TripBooking` from its topic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from saga_es.definition import SagaDefinition, Step


class NoRoomsAvailable(Exception):
    """The hotel is full: the trip cannot go ahead."""


@dataclass
class TripBooking:
    """What the saga carries from step to step; each step records its change to it."""

    customer: str
    destination: str
    nights: int
    hotel_rooms_left: int = 5
    flight: str | None = None
    tickets: str | None = None
    hotel: str | None = None
    cancelled: list[str] = field(default_factory=list)


def _ref(prefix: str, key: str) -> str:
    # The idempotency key is stable across attempts, so a retried booking reuses its reference.
    return f"{prefix}-{key.rsplit(':', 1)[0][:8].upper()}"


def book_flight(trip: TripBooking, key: str) -> None:
    """Reserve a seat to the destination."""
    trip.flight = _ref("FL", key)


def cancel_flight(trip: TripBooking, key: str) -> None:
    """Release the seat booked by `book_flight`."""
    trip.cancelled.append(f"flight {trip.flight}")
    trip.flight = None


def book_tickets(trip: TripBooking, key: str) -> None:
    """Buy the tourist tickets."""
    trip.tickets = _ref("TK", key)


def cancel_tickets(trip: TripBooking, key: str) -> None:
    """Refund the tickets bought by `book_tickets`."""
    trip.cancelled.append(f"tickets {trip.tickets}")
    trip.tickets = None


def book_hotel(trip: TripBooking, key: str) -> None:
    """Book the nights; fails when the hotel is full."""
    if trip.hotel_rooms_left < 1:
        raise NoRoomsAvailable(
            f"Hotel Miramar in {trip.destination} has no rooms for {trip.nights} nights"
        )
    trip.hotel = _ref("HT", key)


def cancel_hotel(trip: TripBooking, key: str) -> None:
    """Cancel the nights booked by `book_hotel`."""
    trip.cancelled.append(f"hotel {trip.hotel}")
    trip.hotel = None


TRIP = SagaDefinition(
    "trip",
    [
        Step("book_flight", book_flight, cancel_flight),
        Step("book_tickets", book_tickets, cancel_tickets),
        Step("book_hotel", book_hotel, cancel_hotel),
    ],
)
"""A travel package: if any booking fails, the earlier ones are undone in reverse order."""

CUSTOMERS = (
    TripBooking(customer="Ada Lovelace", destination="Lisbon", nights=3),
    TripBooking(customer="Blaise Pascal", destination="Lisbon", nights=4, hotel_rooms_left=0),
)
"""Ada's trip goes through; the hotel is full for Blaise."""
